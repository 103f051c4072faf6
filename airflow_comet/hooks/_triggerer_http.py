"""The triggerer's transport: one aiohttp session per connection and event loop, shared by every hook.

Hundreds of triggers poll the same account. Their checks go through many hooks (each worker of the shared
poller has its own, and so has a trigger cancelling its prediction), and every hook of one loop takes a
:class:`Lease` on the same ``ClientSession`` for the same connection: keep-alive connections (at most
:data:`MAX_CONNECTIONS`, idle ones kept :data:`KEEPALIVE` seconds, DNS answers cached) instead of a
connection per trigger, and the connection's request budget (``_ratelimit``) with it. The session is
reference-counted: it closes when the last lease is given back, never under another trigger's feet. It is
keyed by a digest of everything it carries (base URL, key, timeouts, route), so after the connection is
edited new hooks get a new session while running ones finish on the old one.

A server closes idle keep-alive connections when it likes, and a request written just then is lost:

- a status check or a cancel (``idempotent``) may be sent again: aiohttp does so, once, for a GET whose
  connection turned out closed, and the hook's retry policy does for the rest;
- a create must never be sent twice once it may have reached the server (it bills), so it goes on a
  connection of its own, opened for it and closed after it, never on one the server may have closed idle.

Redirects are not followed (the key only ever goes to the connection's host), cookies are not kept, and an
answer larger than :data:`MAX_BODY` is refused rather than buffered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import aiohttp

from airflow_comet.exceptions import CometAPIConfigError
from airflow_comet.hooks._errors import certificate_error, proxy_auth_error, transport_error
from airflow_comet.hooks._per_loop import loop_state
from airflow_comet.hooks._protocol import USER_AGENT
from airflow_comet.hooks._ratelimit import RequestBudget, request_budget
from airflow_comet.hooks._route import tls_context
from airflow_comet.hooks._settings import ConnectionSettings
from airflow_comet.hooks._worker_http import Answer

__all__ = ["KEEPALIVE", "MAX_BODY", "MAX_CONNECTIONS", "Lease", "take_lease"]

#: Connections open at once per connection and triggerer (CometAPI advises capping concurrency); the shared
#: poller keeps at most as many status checks in flight.
MAX_CONNECTIONS = 64
#: Seconds an idle connection is kept for the next request (aiohttp's default).
KEEPALIVE = 15.0
#: Seconds a host name's addresses are kept (aiohttp's default).
DNS_TTL = 10.0
#: An answer larger than this (decompressed) is no CometAPI JSON object: it is refused instead of buffered.
MAX_BODY = 16 * 1024 * 1024


class _Shared:
    """One connection's sessions in one event loop, and how many leases hold them."""

    __slots__ = ("_creates", "closed", "key", "session", "settings", "users")

    def __init__(self, key: tuple[str, str, str], settings: ConnectionSettings) -> None:
        self.key = key
        self.settings = settings
        self.session = _open_session(settings, force_close=False)
        self._creates: aiohttp.ClientSession | None = None
        self.users = 0
        self.closed = False

    def creates(self) -> aiohttp.ClientSession:
        """The session for creates: a new connection for each, closed after its answer (made on first use)."""
        if self._creates is None:
            self._creates = _open_session(self.settings, force_close=True)
        return self._creates

    async def close(self) -> None:
        self.closed = True
        for session in (self.session, self._creates):
            if session is not None:
                await session.close()


class Lease:
    """One hook's share of its connection's session in the running loop, with the connection's budget."""

    __slots__ = ("_shared", "budget", "loop")

    def __init__(self, shared: _Shared, budget: RequestBudget) -> None:
        self._shared = shared
        self.budget = budget
        self.loop = asyncio.get_running_loop()

    @property
    def usable(self) -> bool:
        """Whether requests can go through it: open, and of the running loop (a lease taken in a loop that has
        ended, say a hook left open across two ``asyncio.run`` calls, would wait for ever)."""
        return not self._shared.closed and self.loop is asyncio.get_running_loop()

    async def release(self) -> None:
        """Give the share back (once per lease); the sessions close with the last one, in their own loop."""
        shared = self._shared
        if shared.closed or self.loop is not asyncio.get_running_loop():
            return  # another loop's: forgotten, not closed (its connections cannot be closed from this one)
        shared.users -= 1
        if shared.users > 0:
            return
        state = loop_state()
        if state.get(shared.key) is shared:  # forgotten first, so that a hook arriving meanwhile opens anew
            del state[shared.key]
        await shared.close()

    async def send(
        self,
        settings: ConnectionSettings,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        hold: float,
        *,
        urgent: bool = False,
        idempotent: bool = True,
        patience: float | None = None,
    ) -> Answer:
        """Wait for the budget's slot, send one request and return its answer (any status), or raise what went
        wrong on the way (``CometAPITransportError`` saying whether it may have been sent, or a config error).

        :param idempotent: Whether sending it twice is harmless; a request that is not (a create) goes on a
            fresh connection of its own.
        :param urgent: Take the budget's next slot ahead of the requests queued for it (a cancel).
        :param patience: Give up, unsent, rather than wait out a pause of the connection (a ``429``'s
            ``Retry-After``) longer than this many seconds: ``PausedTooLong``.
        """
        await self.budget.acquire(urgent=urgent, patience=patience)
        shared = self._shared
        if shared.closed:
            raise transport_error(
                settings, method, path, "not sent", RuntimeError("the session was closed"), maybe_sent=False
            )
        session = shared.session if idempotent else shared.creates()
        timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout + hold
        )
        try:
            async with session.request(
                method,
                settings.url(path),
                data=None if body is None else json.dumps(body).encode(),
                headers=headers,
                proxy=settings.proxy,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                return Answer(response.status, response.headers, await _read(response))
        except aiohttp.ClientHttpProxyError as e:  # the proxy's answer to CONNECT
            refusal = f"the proxy refused the tunnel to {settings.base_url} ({e.status} {e.message})"
            if e.status == 407:
                raise proxy_auth_error(settings, refusal) from None
            raise transport_error(settings, method, path, refusal, e, maybe_sent=False) from None
        except aiohttp.ClientConnectorCertificateError as e:
            raise certificate_error(settings, f"{e.host}:{e.port}: {e.certificate_error}") from None
        except aiohttp.ClientConnectorError as e:  # refused, unknown host, TLS handshake, the proxy unreachable
            what = (
                "connection to the proxy failed"
                if isinstance(e, aiohttp.ClientProxyConnectionError)
                else "connection failed"
            )
            raise transport_error(settings, method, path, what, e, maybe_sent=False) from None
        except aiohttp.ConnectionTimeoutError as e:
            raise transport_error(settings, method, path, "connect timed out", e, maybe_sent=False) from None
        except _TooLarge as e:
            raise transport_error(settings, method, path, "answer refused", e, maybe_sent=True) from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            # Read timeout, a connection closed or reset mid-answer, an answer that is not HTTP: sent.
            raise transport_error(settings, method, path, "no complete answer", e, maybe_sent=True) from None
        except RuntimeError as e:  # aiohttp's "Session is closed": the last lease was given back meanwhile
            raise transport_error(settings, method, path, "not sent", e, maybe_sent=False) from None


def take_lease(settings: ConnectionSettings) -> Lease:
    """A share of the session every hook of ``settings.conn_id`` uses in the running loop (opened on first
    use), with the connection's budget; give it back with :meth:`Lease.release`."""
    state = loop_state()
    key = ("session", settings.conn_id, _digest(settings))
    shared = state.get(key)
    if shared is None or shared.closed:
        shared = state[key] = _Shared(key, settings)
    shared.users += 1
    return Lease(shared, request_budget(settings.conn_id, settings.max_requests_per_second))


def _digest(settings: ConnectionSettings) -> str:
    """What a session carries, as a digest (never the key itself in a dict key)."""
    carried = (
        settings.base_url,
        settings.api_key,
        settings.connect_timeout,
        settings.read_timeout,
        settings.proxy,
        settings.verify,
        settings.cert,
    )
    return hashlib.sha256(repr(carried).encode()).hexdigest()


def _open_session(settings: ConnectionSettings, *, force_close: bool) -> aiohttp.ClientSession:
    try:
        context = tls_context(settings.verify, settings.cert)
    except CometAPIConfigError as error:
        raise CometAPIConfigError(f"Connection {settings.conn_id!r}: {error}") from None
    connector = aiohttp.TCPConnector(
        limit=MAX_CONNECTIONS,
        limit_per_host=0,
        keepalive_timeout=None if force_close else KEEPALIVE,
        force_close=force_close,
        use_dns_cache=True,
        ttl_dns_cache=int(DNS_TTL),
        ssl=context,  # the host's and an https proxy's certificates, checked alike
    )
    return aiohttp.ClientSession(
        connector=connector,
        headers={"Authorization": f"Bearer {settings.api_key}", "User-Agent": USER_AGENT, "Accept": "application/json"},
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,  # the route is the settings' (``_route``), as in the worker
    )


class _TooLarge(Exception):
    pass


async def _read(response: aiohttp.ClientResponse) -> bytes:
    """The whole body, decompressed, or :class:`_TooLarge` past :data:`MAX_BODY`."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge(f"the answer is larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
