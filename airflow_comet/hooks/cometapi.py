"""The CometAPI hook: auth, HTTP and retries for the Replicate-format prediction API."""

from __future__ import annotations

import dataclasses

import asyncio
import json
import logging
import re
import ssl
from collections.abc import Mapping
from functools import cached_property, partial
from typing import Any

import requests
import urllib3
from airflow.providers.common.compat.sdk import BaseHook
from requests_toolbelt.adapters.socket_options import TCPKeepAliveAdapter  # a dependency of providers-http

from airflow_comet import __version__
from airflow_comet.exceptions import (
    CometAPIAuthError,
    CometAPICertificateError,
    CometAPIConfigError,
    CometAPIError,
    CometAPINotFoundError,
    CometAPIResponseError,
    CometAPITransportError,
)
from airflow_comet.hooks import _protocol as protocol
from airflow_comet.hooks._http1 import (
    CertificateRejected,
    ConnectionPool,
    HTTPTransportError,
    PoolClosed,
    ProxyAuthRequired,
)
from airflow_comet.hooks._masking import mask
from airflow_comet.hooks._protocol import DEFAULT_HOST, ConnectionSettings
from airflow_comet.hooks._ratelimit import RequestBudget, release_pool, request_budget, shared_pool
from airflow_comet.hooks._retry import RetryPolicy, acall_with_retries, call_with_retries
from airflow_comet.hooks._settings_cache import cached_settings, settings_refused

log = logging.getLogger(__name__)

USER_AGENT = f"airflow-comet/{__version__}"
#: urllib3's words for a proxy that answered CONNECT with 407 (the rest of its message names paths and ports).
_PROXY_407 = re.compile(r"Tunnel connection failed: 407\b")
#: Extra seconds of read timeout on top of a ``Prefer: wait`` hold, so the hold itself never times out.
_PREFER_WAIT_MARGIN = 15.0


class BearerAuth(requests.auth.AuthBase):
    """Sets ``Authorization: Bearer <key>``; its repr never shows the key."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(***)"


class CometAPIHook(BaseHook):
    """
    Talk to CometAPI's Replicate-format prediction API.

    The key is the connection's password; the host defaults to ``https://api.cometapi.com``. Optional
    extras: ``connect_timeout`` (s, default 10), ``read_timeout`` (s, default 90), ``max_retries``
    (default 6), ``max_retry_wait`` (cap on ``Retry-After``, s, default 60), ``retry_backoff`` (first
    backoff, s, default 1) and ``max_requests_per_second`` (budget for all triggers of this connection in
    one triggerer).

    Every URL is built from the connection's host: ``urls.*`` in CometAPI's answers point at another
    company's hosts and are never followed, so the key is only ever sent to the connection's host.

    A plain ``BaseHook`` with its own ``requests`` session, not an ``HttpHook``: that one sends every
    connection extra it does not know as an HTTP header, and its ``run`` methods would send without the
    key, the retry policy and the refusal of redirects. Extras here are settings, never headers.

    :param cometapi_conn_id: The Airflow connection id.
    :param retry_policy: Overrides the retry settings read from the connection.
    """

    conn_name_attr = "cometapi_conn_id"
    default_conn_name = "cometapi_default"
    conn_type = "cometapi"
    hook_name = "CometAPI"
    default_host = DEFAULT_HOST

    def __init__(
        self, cometapi_conn_id: str = default_conn_name, *, retry_policy: RetryPolicy | None = None
    ) -> None:
        # No requests session yet (a pool manager, a lock, ~12 objects the garbage collector walks): a
        # trigger, which only uses the async transport, would carry it for nothing. See ``session``.
        super().__init__()
        self.cometapi_conn_id = cometapi_conn_id
        self._retry_policy = retry_policy
        self._settings: ConnectionSettings | None = None
        self._async_pool: ConnectionPool | None = None
        self._budget: RequestBudget | None = None  # this connection's budget in this loop; set with the pool
        self._pool_loop: asyncio.AbstractEventLoop | None = None  # the event loop the pool was taken in

    # -- connection form (Airflow < 3.2 reads these; newer versions read get_provider_info) --------------

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """The CometAPI extras as form fields, for Airflow 2.11 to 3.1 (3.2+ reads the provider info's)."""
        from airflow_comet.get_provider_info import get_provider_info
        from airflow_comet.hooks._form import connection_form_widgets

        (conn_type,) = get_provider_info()["connection-types"]
        return connection_form_widgets(conn_type["conn-fields"])

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Relabel the connection form: the key is the password, the host is the API base URL."""
        # The hook method takes snake_case keys (Airflow 2 validates them); provider info takes kebab-case.
        return {
            "hidden_fields": ["schema", "login", "port"],
            "relabeling": {"password": "CometAPI key", "host": "Base URL"},
            "placeholders": {
                "host": DEFAULT_HOST,
                "extra": '{"read_timeout": 90, "max_retries": 6, "max_requests_per_second": 20}',
            },
        }

    # -- settings ---------------------------------------------------------------------------------------

    @property
    def settings(self) -> ConnectionSettings:
        """The connection's parsed settings (looked up once, synchronously)."""
        if self._settings is None:
            conn = self.get_connection(self.cometapi_conn_id)
            self._settings = ConnectionSettings.from_connection(conn, conn.extra_dejson)
            mask(self._settings.api_key)
        return self._settings

    async def aget_settings(self) -> ConnectionSettings:
        """The connection's parsed settings, looked up without blocking the event loop (and shared with the
        other hooks of this connection in the loop for a short while: see ``_settings_cache``)."""
        if self._settings is None:
            self._settings = await cached_settings(self.cometapi_conn_id, self._alook_up_settings)
        return self._settings

    async def _alook_up_settings(self) -> ConnectionSettings:
        from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson

        conn = await get_async_connection(self.cometapi_conn_id, hook=type(self))
        extras = await get_async_extra_dejson(conn)
        return ConnectionSettings.from_connection(conn, extras)

    async def _aforget_settings(self, refused: ConnectionSettings) -> None:
        """After a 401 to ``refused``'s key: take the settings afresh on the next request (the key may have
        been changed meanwhile; the cache decides whether to look the connection up again for it)."""
        settings_refused(self.cometapi_conn_id, refused.api_key)
        self._settings = None
        await self.aclose()  # the shared pool carries the old key

    def retry_policy(self, settings: ConnectionSettings) -> RetryPolicy:
        return self._retry_policy or RetryPolicy(
            max_retries=settings.max_retries,
            backoff_base=settings.retry_backoff,
            max_retry_wait=settings.max_retry_wait,
        )

    # -- sync transport (requests) ------------------------------------------------------------------------

    def get_conn(self) -> requests.Session:
        """The hook's requests session (:attr:`session`)."""
        return self.session

    @cached_property
    def session(self) -> requests.Session:
        """One keep-alive session for the hook's lifetime, built on first sync use."""
        settings = self.settings
        session = requests.Session()
        # TCP keep-alive probes (HttpHook's settings): a long Prefer: wait hold is not dropped as idle by a
        # NAT or firewall on the way.
        adapter = TCPKeepAliveAdapter(idle=120, count=20, interval=30)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.auth = BearerAuth(settings.api_key)
        session.headers["User-Agent"] = USER_AGENT
        session.headers["Accept"] = "application/json"
        # The route the triggerer takes too (hooks/_route.py): requests' own reading of the environment off,
        # so that it cannot choose another proxy or CA bundle than the settings say.
        session.trust_env = False
        session.proxies = {"http": settings.proxy, "https": settings.proxy} if settings.proxy else {}
        session.verify = settings.verify
        return session

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        idempotent: bool = True,
        headers: Mapping[str, str] | None = None,
        hold: float = 0.0,
        policy: RetryPolicy | None = None,
    ) -> dict[str, Any]:
        settings = self.settings
        return call_with_retries(
            lambda: self._send(settings, method, path, body, headers, hold),
            policy=policy or self.retry_policy(settings),
            idempotent=idempotent,
            logger=self.log,
            what=f"{method} {path}",
        )

    def _send(
        self,
        settings: ConnectionSettings,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        hold: float,
    ) -> dict[str, Any]:
        try:
            response = self.session.request(
                method,
                settings.url(path),
                json=body,
                headers=dict(headers or {}),
                timeout=(settings.connect_timeout, settings.read_timeout + hold),
                # A redirect means a wrong host; following it could carry the key elsewhere.
                allow_redirects=False,
            )
        except requests.exceptions.ConnectTimeout as e:
            raise _transport_error(method, path, "connect timed out", e, maybe_sent=False) from None
        except requests.exceptions.ProxyError as e:
            if _PROXY_407.search(str(e)):  # as the triggerer's ProxyAuthRequired: new credentials, not time
                raise _proxy_auth_error(
                    settings, f"the proxy refused the tunnel to {settings.base_url} (407 Proxy Authentication Required)"
                ) from None
            raise _transport_error(method, path, "connection to the proxy failed", e, maybe_sent=False) from None
        except requests.exceptions.ConnectionError as e:
            reasons = _reasons(e)
            if any(isinstance(r, ssl.SSLCertVerificationError) for r in reasons):
                raise _certificate_error(settings, str(reasons[-1])) from None
            # Refused, unknown host (permanent or temporary), connect timeout: nothing was sent, so even a
            # create may be sent again. Anything else (a reset, a TLS error mid-answer) may have reached it.
            not_sent = any(isinstance(r, urllib3.exceptions.ConnectTimeoutError) for r in reasons)
            raise _transport_error(
                method, path, "connection failed", _urllib3_reason(reasons), maybe_sent=not not_sent
            ) from None
        except requests.exceptions.RequestException as e:
            # ReadTimeout, ChunkedEncodingError: the request was sent, the answer did not come back whole.
            raise _transport_error(method, path, "no complete answer", e, maybe_sent=True) from None
        return self._parse(settings, method, path, response.status_code, response.headers, response.content)

    # -- async transport (_http1, one keep-alive pool per connection shared by the triggers of a loop) -----

    async def __aenter__(self) -> CometAPIHook:
        await self._aget_pool()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Let go of the async connection pool (idempotent); it closes with the last hook sharing it."""
        pool, loop = self._async_pool, self._pool_loop
        self._async_pool = self._budget = self._pool_loop = None
        # A pool of another event loop is only forgotten (see _held_pool): its connections cannot be closed
        # from this one.
        if pool is not None and loop is asyncio.get_running_loop():
            await release_pool(pool)

    def _held_pool(self) -> ConnectionPool | None:
        """The pool this hook holds, if it is still open and of the running event loop (a request needs no
        coroutine to get it)."""
        pool = self._async_pool
        if pool is None or pool.closed:
            return None
        if self._pool_loop is not asyncio.get_running_loop():
            # Taken in another loop, most often one that has ended (a hook left open across two asyncio.run
            # calls): that loop no longer runs the pool's connections and timers, so a request on them would
            # wait for ever. Forgotten, not closed; the next request takes this loop's pool and budget.
            self._async_pool = self._budget = self._pool_loop = None
            return None
        return pool

    async def _aget_pool(self) -> ConnectionPool:
        if self._held_pool() is None:
            settings = await self.aget_settings()
            # One pool of keep-alive connections per connection and event loop, shared by every trigger.
            self._async_pool = shared_pool(settings, lambda: new_connection_pool(settings))
            self._pool_loop = asyncio.get_running_loop()
            # Shared by every trigger of this connection in this event loop, as the pool is: the request
            # budget and 429 pauses. Taken once per pool rather than looked up per request.
            self._budget = request_budget(settings.conn_id, settings.max_requests_per_second)
        return self._async_pool

    async def _arequest(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        idempotent: bool = True,
        headers: Mapping[str, str] | None = None,
        hold: float = 0.0,
        urgent: bool = False,
    ) -> dict[str, Any]:
        # The settings and the pool (in _asend) a hook already holds are used without awaiting a coroutine
        # for each: a status check is the triggerer's hot path (benchmarks/steady_checks.py).
        settings = self._settings or await self.aget_settings()
        policy = self.retry_policy(settings)
        if policy.passes_errors_through(idempotent=idempotent):
            # What acall_with_retries would do, without its layer: the shared poller's checks come this way.
            return await self._asend(settings, method, path, body, headers, hold, urgent, idempotent)
        return await acall_with_retries(
            # A partial, not a lambda: a closure over these nine names is a cell each, per status check, for
            # the garbage collector to count (and to promote with the checks in flight when it runs).
            partial(self._asend, settings, method, path, body, headers, hold, urgent, idempotent),
            policy=policy,
            idempotent=idempotent,
            logger=self.log,
            what=f"{method} {path}",
        )

    async def _asend(
        self,
        settings: ConnectionSettings,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        hold: float,
        urgent: bool = False,
        idempotent: bool = True,
    ) -> dict[str, Any]:
        pool = self._held_pool() or await self._aget_pool()
        budget = self._budget
        assert budget is not None  # taken with the pool
        if not budget.take_free_slot():  # most requests find one: no coroutine for them
            await budget.acquire(urgent=urgent)
        try:
            response = await pool.request(
                method,
                path,
                body=None if body is None else json.dumps(body).encode(),
                headers=headers,
                read_timeout=settings.read_timeout + hold,
                idempotent=idempotent,
            )
        except ProxyAuthRequired as e:
            raise _proxy_auth_error(settings, str(e)) from None
        except CertificateRejected as e:
            raise _certificate_error(settings, str(e)) from None
        except HTTPTransportError as e:
            what = "no complete answer" if e.sent else "connection failed"
            if isinstance(e, PoolClosed):
                what = "not sent: the connection pool was closed"
            raise _transport_error(method, path, what, e, maybe_sent=e.sent) from None
        try:
            return self._parse(settings, method, path, response.status, response.headers, response.body)
        except CometAPIAuthError:
            # A key rotated in the connection while triggers run: the next poll picks the new one up.
            await self._aforget_settings(settings)
            raise
        except CometAPIResponseError as e:
            if e.status_code == 429 and e.retry_after:
                budget.pause(e.retry_after)
            raise

    # -- shared ------------------------------------------------------------------------------------------

    @staticmethod
    def _parse(
        settings: ConnectionSettings,
        method: str,
        path: str,
        status: int,
        headers: Mapping[str, str],
        content: bytes,
    ) -> dict[str, Any]:
        try:
            return protocol.parse_answer(
                method=method,
                path=path,
                status=status,
                # Lower-case names: the async transport's headers are a plain dict of them (requests' are
                # case-insensitive).
                content_type=headers.get("content-type", ""),
                body=content,
                headers=headers,
                max_retry_wait=settings.max_retry_wait,
            )
        except CometAPIError as error:
            # The API's own text goes into the message: make sure it cannot echo the key back.
            _scrub(error, settings.api_key)
            if isinstance(error, CometAPIAuthError):
                error.message += (
                    f" Check the CometAPI key in connection {settings.conn_id!r} (its password field)."
                )
                error.args = (error.message,)
            raise

    # -- the API ----------------------------------------------------------------------------------------

    def create_prediction(
        self,
        model: str,
        input: Mapping[str, Any],
        *,
        prefer_wait: int | None = None,
        longest_sleep: float | None = None,
    ) -> dict[str, Any]:
        """Start a prediction of ``model`` (``owner/name``) with ``input``; return the prediction object.

        :param prefer_wait: Ask the server to hold the answer up to this many seconds (``Prefer: wait``)
            so a fast prediction comes back finished; harmless where the server ignores it.
        :param longest_sleep: Raise :class:`~airflow_comet.exceptions.CometAPIRetryLaterError` instead of
            sleeping when CometAPI asks to wait longer than this (the caller waits elsewhere).
        """
        path, body, headers, hold = self._create_request(model, input, prefer_wait)
        policy = None
        if longest_sleep is not None:
            policy = dataclasses.replace(self.retry_policy(self.settings), longest_sleep=longest_sleep)
        return self._request("POST", path, body=body, idempotent=False, headers=headers, hold=hold, policy=policy)

    async def acreate_prediction(
        self, model: str, input: Mapping[str, Any], *, prefer_wait: int | None = None
    ) -> dict[str, Any]:
        """Async :meth:`create_prediction`."""
        path, body, headers, hold = self._create_request(model, input, prefer_wait)
        return await self._arequest("POST", path, body=body, idempotent=False, headers=headers, hold=hold)

    def get_prediction(self, prediction_id: str) -> dict[str, Any]:
        """Return the prediction object for ``prediction_id``."""
        return _about(prediction_id, self._request("GET", protocol.prediction_path(prediction_id)))

    async def aget_prediction(self, prediction_id: str) -> dict[str, Any]:
        """Async :meth:`get_prediction`."""
        return _about(prediction_id, await self._arequest("GET", protocol.prediction_path(prediction_id)))

    def cancel_prediction(self, prediction_id: str) -> dict[str, Any] | None:
        """Ask CometAPI to cancel a prediction (best effort: cancel is not documented by CometAPI).

        Returns the prediction object, or ``None`` when the endpoint is missing (404/405), which is logged.
        """
        try:
            return self._request("POST", protocol.cancel_path(prediction_id))
        except CometAPIResponseError as error:
            return self._cancel_unsupported(prediction_id, error)

    async def acancel_prediction(self, prediction_id: str) -> dict[str, Any] | None:
        """Async :meth:`cancel_prediction`."""
        try:
            # Urgent: ahead of the status checks queued for the request budget (on_kill has about 25 s).
            return await self._arequest("POST", protocol.cancel_path(prediction_id), urgent=True)
        except CometAPIResponseError as error:
            return self._cancel_unsupported(prediction_id, error)

    def _cancel_unsupported(self, prediction_id: str, error: CometAPIResponseError) -> None:
        if isinstance(error, CometAPINotFoundError) or error.status_code in (404, 405, 501):
            self.log.warning("Could not cancel prediction %s: %s", prediction_id, error)
            return None
        raise error

    def test_connection(self) -> tuple[bool, str]:
        """Check host and key without starting a prediction (nothing is billed).

        Asks for a prediction id that cannot exist: CometAPI's JSON 404 proves the host and key are right.
        Sent once, never retried: the form's button should answer in seconds, not after a minute of backoff.
        """
        try:
            self._request(
                "GET", protocol.prediction_path("airflow-comet-connection-test"), policy=RetryPolicy(max_retries=0)
            )
        except CometAPINotFoundError:
            return True, f"Connected to {self.settings.base_url}: the key was accepted."
        except CometAPIError as error:
            # Airflow runs the test under a throwaway id (e.g. 'bIvkavl2'), which the person at the form never
            # chose: say "this connection" instead of naming it.
            named = re.compile(rf"\b([Cc])onnection {re.escape(repr(self.cometapi_conn_id))}")
            return False, named.sub(lambda m: ("T" if m[1] == "C" else "t") + "his connection", str(error))
        return True, f"Connected to {self.settings.base_url}."

    @staticmethod
    def _create_request(
        model: str, input: Mapping[str, Any], prefer_wait: int | None
    ) -> tuple[str, dict[str, Any], dict[str, str], float]:
        from airflow_comet.validation import validate_input, validate_prefer_wait

        path = protocol.create_path(model)
        body = {"input": validate_input(input)}
        headers: dict[str, str] = {"Content-Type": "application/json"}
        hold = 0.0
        if prefer_wait:
            headers["Prefer"] = f"wait={validate_prefer_wait(prefer_wait)}"
            # The server may legitimately hold the answer that long: extend the read timeout to match.
            hold = prefer_wait + _PREFER_WAIT_MARGIN
        return path, body, headers, hold


async def aconnection_settings(conn_id: str) -> ConnectionSettings:
    """The settings of ``conn_id`` as a hook in the running loop would get them; a hook is built only when
    they have to be looked up (a trigger checks its connection at start without a hook of its own)."""
    return await cached_settings(conn_id, lambda: CometAPIHook(conn_id)._alook_up_settings())


def new_connection_pool(settings: ConnectionSettings) -> ConnectionPool:
    """A pool of keep-alive connections that sends the connection's key to its host, with its timeouts.

    No cap on connections here: the triggerer's shared poller caps its status checks in flight itself
    (``MAX_WORKERS``). No cookies either: the API sets none we need. Proxy and certificate checks as the
    worker's requests session has them (``ConnectionSettings.proxy`` / ``verify``).
    """
    proxy = settings.proxy
    if proxy and not proxy.lower().startswith("http://"):
        # Connecting directly, as before the triggerer read proxies at all, rather than failing a wait whose
        # create went through (requests handles socks and https proxies; this client does not).
        log.warning(
            "Connection %s: the triggerer cannot go through a %s proxy; connecting directly",
            settings.conn_id,
            proxy.split("://", 1)[0],
        )
        proxy = None
    try:
        return ConnectionPool(
            settings.base_url,
            headers={
                "Authorization": f"Bearer {settings.api_key}",
                "User-Agent": USER_AGENT,
                "Accept": "application/json",
            },
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            proxy=proxy,
            verify=settings.verify,
        )
    except (ValueError, OSError) as error:  # an unreadable CA bundle
        raise CometAPIConfigError(f"Connection {settings.conn_id!r}: {error}") from None


def _about(prediction_id: str, prediction: dict[str, Any]) -> dict[str, Any]:
    """``prediction`` if it is the one asked for: an answer out of step (a proxy, a connection that lost
    track) must never give one prediction another's status or outputs."""
    other = prediction.get("id")
    if other is not None and other != prediction_id:
        raise CometAPIResponseError(
            f"CometAPI answered the status query of prediction {prediction_id} with prediction {other!r}",
            status_code=200,
        )
    return prediction


def _proxy_auth_error(settings: ConnectionSettings, refusal: str) -> CometAPIConfigError:
    """A proxy answered 407, in either transport: not retried (new credentials are needed, not time)."""
    return CometAPIConfigError(f"Connection {settings.conn_id!r}: {refusal}; check the proxy's user name and password")


def _certificate_error(settings: ConnectionSettings, reason: str) -> CometAPICertificateError:
    """The host's TLS certificate was not trusted, in either transport: not retried (a CA is missing, which
    time does not fix), and the message says which setting to change."""
    return CometAPICertificateError(
        f"Connection {settings.conn_id!r}: the TLS certificate of {settings.base_url} was rejected ({reason}). "
        "If a proxy or gateway re-signs TLS with your company's CA, set the connection extra 'verify' to that "
        "CA bundle's path."
    )


def _reasons(error: BaseException) -> list[BaseException]:
    """``error`` and what it wraps, outermost first: requests wraps urllib3's ``MaxRetryError``, whose
    ``reason`` is the real failure (``NameResolutionError``, ``SSLError``, ...), which wraps the OS's."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(chain) < 8 and all(current is not seen for seen in chain):
        chain.append(current)
        inner = getattr(current, "reason", None)  # ssl.SSLError's reason is a string, not an exception
        if not isinstance(inner, BaseException):
            first = current.args[0] if current.args else None
            inner = first if isinstance(first, BaseException) else None
        current = inner or current.__cause__ or current.__context__
    return chain


def _urllib3_reason(reasons: list[BaseException]) -> BaseException:
    """The failure worth naming: urllib3's own (it names the host and the OS error) rather than requests'
    wrapper, whose first 200 characters are the pool and the URL."""
    for reason in reasons:
        if isinstance(reason, urllib3.exceptions.HTTPError) and not isinstance(
            reason, urllib3.exceptions.MaxRetryError
        ):
            return reason
    return reasons[0]


def _transport_error(method: str, path: str, what: str, error: BaseException, *, maybe_sent: bool) -> CometAPITransportError:
    detail = type(error).__name__
    text = str(error)
    if text:
        detail += f": {text[:200]}"
    return CometAPITransportError(f"{method} {path}: {what} ({detail})", maybe_sent=maybe_sent)


def _scrub(error: CometAPIError, secret: str) -> None:
    if secret and secret in error.message:
        error.message = error.message.replace(secret, "***")
        error.args = (error.message,)
