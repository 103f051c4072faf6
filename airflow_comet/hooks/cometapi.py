"""The CometAPI hook: auth, HTTP and retries for the Replicate-format prediction API."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseHook

from airflow_comet.exceptions import (
    CometAPIAuthError,
    CometAPIError,
    CometAPINotFoundError,
    CometAPIResponseError,
    CometAPIRetryLaterError,
)
from airflow_comet.hooks import _protocol as protocol
from airflow_comet.hooks._errors import proxy_auth_error
from airflow_comet.hooks._masking import mask
from airflow_comet.hooks._per_loop import in_worker_loop
from airflow_comet.hooks._protocol import DEFAULT_HOST, USER_AGENT
from airflow_comet.hooks._ratelimit import PausedTooLong
from airflow_comet.hooks._retry import RetryPolicy, acall_with_retries, call_with_retries
from airflow_comet.hooks._settings import ConnectionSettings
from airflow_comet.hooks._settings_cache import cached_settings, settings_refused

if TYPE_CHECKING:
    import requests

    from airflow_comet.hooks._triggerer_http import Lease

__all__ = ["USER_AGENT", "CometAPIHook", "aconnection_settings"]

#: Extra seconds of read timeout on top of a ``Prefer: wait`` hold, so the hold itself never times out.
_PREFER_WAIT_MARGIN = 15.0


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

    The API methods are here; the requests go through the worker's transport (``_worker_http``, blocking
    methods) or the triggerer's (``_triggerer_http``, the ``a``-prefixed ones), both read by ``_protocol``.

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

    def __init__(self, cometapi_conn_id: str = default_conn_name, *, retry_policy: RetryPolicy | None = None) -> None:
        super().__init__()
        self.cometapi_conn_id = cometapi_conn_id
        self._retry_policy = retry_policy
        self._settings: ConnectionSettings | None = None
        self._lease: Lease | None = None  # the triggerer's session share, taken on first async use

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
            self._settings = self._look_up_settings()
        return self._settings

    def _look_up_settings(self) -> ConnectionSettings:
        conn = self.get_connection(self.cometapi_conn_id)
        settings = ConnectionSettings.from_connection(conn, conn.extra_dejson)
        mask(settings.api_key)
        return settings

    async def aget_settings(self) -> ConnectionSettings:
        """The connection's parsed settings, looked up without blocking the event loop (and shared with the
        other hooks of this connection in the loop for a short while: see ``_settings_cache``)."""
        if self._settings is None:
            self._settings = await cached_settings(self.cometapi_conn_id, self._alook_up_settings)
        return self._settings

    async def _alook_up_settings(self) -> ConnectionSettings:
        if in_worker_loop():
            # A task's own loop in the worker: the blocking lookup, in a thread (see new_worker_loop).
            return await asyncio.to_thread(self._look_up_settings)
        from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson

        conn = await get_async_connection(self.cometapi_conn_id, hook=type(self))
        extras = await get_async_extra_dejson(conn)
        return ConnectionSettings.from_connection(conn, extras)

    async def _aforget_settings(self, refused: ConnectionSettings) -> None:
        """After a 401 to ``refused``'s key: take the settings afresh on the next request (the key may have
        been changed meanwhile; the cache decides whether to look the connection up again for it)."""
        settings_refused(self.cometapi_conn_id, refused.api_key)
        self._settings = None
        await self.aclose()  # the shared session carries the old key

    def retry_policy(self, settings: ConnectionSettings, longest_sleep: float | None = None) -> RetryPolicy:
        """The retries of this hook's requests; with ``longest_sleep``, a longer server-requested wait raises
        :class:`~airflow_comet.exceptions.CometAPIRetryLaterError` instead of being slept."""
        policy = self._retry_policy or RetryPolicy(
            max_retries=settings.max_retries,
            backoff_base=settings.retry_backoff,
            max_retry_wait=settings.max_retry_wait,
        )
        return policy if longest_sleep is None else dataclasses.replace(policy, longest_sleep=longest_sleep)

    # -- the worker's transport (requests, hooks/_worker_http.py) ----------------------------------------

    def get_conn(self) -> requests.Session:
        """The hook's requests session (:attr:`session`)."""
        return self.session

    @cached_property
    def session(self) -> requests.Session:
        """One keep-alive session for the hook's lifetime, built on first blocking use (a trigger never
        needs one)."""
        from airflow_comet.hooks._worker_http import new_session

        return new_session(self.settings)

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
        longest_sleep: float | None = None,
    ) -> dict[str, Any]:
        from airflow_comet.hooks._worker_http import send

        settings = self.settings

        def attempt() -> dict[str, Any]:
            answer = send(self.session, settings, method, path, body, headers, hold)
            return self._parse(settings, method, path, answer.status, answer.headers, answer.body)

        return call_with_retries(
            attempt,
            policy=policy or self.retry_policy(settings, longest_sleep),
            idempotent=idempotent,
            logger=self.log,
            what=f"{method} {path}",
        )

    # -- the triggerer's transport (aiohttp, hooks/_triggerer_http.py) -------------------------------------

    async def __aenter__(self) -> CometAPIHook:
        await self._alease()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Give back the hook's share of the connection's session (idempotent); the session closes with the
        last hook sharing it."""
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.release()

    async def _alease(self) -> Lease:
        """The hook's share of its connection's session in the running loop, taken on first use."""
        lease = self._lease
        if lease is None or not lease.usable:
            from airflow_comet.hooks._triggerer_http import take_lease

            # One left from another loop (most often one that has ended) is forgotten, not given back.
            self._lease = lease = take_lease(await self.aget_settings())
        return lease

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
        longest_sleep: float | None = None,
    ) -> dict[str, Any]:
        settings = await self.aget_settings()
        policy = self.retry_policy(settings, longest_sleep)

        async def attempt() -> dict[str, Any]:
            return await self._asend(settings, method, path, body, headers, hold, urgent, idempotent, longest_sleep)

        return await acall_with_retries(
            attempt,
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
        urgent: bool,
        idempotent: bool,
        patience: float | None = None,
    ) -> dict[str, Any]:
        lease = await self._alease()
        try:
            answer = await lease.send(
                settings, method, path, body, headers, hold, urgent=urgent, idempotent=idempotent, patience=patience
            )
        except PausedTooLong as paused:
            # Another request's 429 paused the connection for longer than this caller sleeps: not sent.
            raise CometAPIRetryLaterError(
                f"{method} {path} was not sent: CometAPI asked this connection to wait {paused.seconds:.0f} s "
                "(429 Retry-After)",
                status_code=429,
                retryable=True,
                retry_after=paused.seconds,
            ) from None
        try:
            return self._parse(settings, method, path, answer.status, answer.headers, answer.body)
        except CometAPIAuthError:
            # A key rotated in the connection while triggers run: the next poll picks the new one up.
            await self._aforget_settings(settings)
            raise
        except CometAPIResponseError as e:
            if e.status_code == 429 and e.retry_after:
                lease.budget.pause(e.retry_after)
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
        if status == 407 and settings.proxy:  # a plain-http host behind a proxy: its answer, not the API's
            raise proxy_auth_error(settings, "the proxy answered 407 Proxy Authentication Required")
        try:
            return protocol.parse_answer(
                method=method,
                path=path,
                status=status,
                # Both transports' headers are case-insensitive.
                content_type=headers.get("content-type", ""),
                body=content,
                headers=headers,
                max_retry_wait=settings.max_retry_wait,
            )
        except CometAPIError as error:
            # The API's own text goes into the message: make sure it cannot echo the key back.
            _scrub(error, settings.api_key)
            if isinstance(error, CometAPIAuthError):
                error.message += f" Check the CometAPI key in connection {settings.conn_id!r} (its password field)."
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
        return self._request(
            "POST", path, body=body, idempotent=False, headers=headers, hold=hold, longest_sleep=longest_sleep
        )

    async def acreate_prediction(
        self,
        model: str,
        input: Mapping[str, Any],
        *,
        prefer_wait: int | None = None,
        longest_sleep: float | None = None,
    ) -> dict[str, Any]:
        """Async :meth:`create_prediction` (with ``longest_sleep``, a pause of the connection longer than that,
        set by another request's 429, raises the same error without sending)."""
        path, body, headers, hold = self._create_request(model, input, prefer_wait)
        return await self._arequest(
            "POST", path, body=body, idempotent=False, headers=headers, hold=hold, longest_sleep=longest_sleep
        )

    def get_prediction(self, prediction_id: str) -> dict[str, Any]:
        """Return the prediction object for ``prediction_id``."""
        return _about(prediction_id, self._request("GET", protocol.prediction_path(prediction_id)))

    async def aget_prediction(self, prediction_id: str, *, longest_sleep: float | None = None) -> dict[str, Any]:
        """Async :meth:`get_prediction` (``longest_sleep`` as in :meth:`acreate_prediction`)."""
        path = protocol.prediction_path(prediction_id)
        return _about(prediction_id, await self._arequest("GET", path, longest_sleep=longest_sleep))

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

    def _cancel_unsupported(self, prediction_id: str, error: CometAPIResponseError) -> dict[str, Any] | None:
        """``None`` (logged) when the API has no cancel endpoint, as CometAPI documents none; else ``error``."""
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


def _scrub(error: CometAPIError, secret: str) -> None:
    if secret and secret in error.message:
        error.message = error.message.replace(secret, "***")
        error.args = (error.message,)
