"""A small keep-alive HTTP/1.1 client: the transport of the hook's async requests (the triggerer's).

Why not aiohttp, which this replaced: in a triggerer every status check is an event of its own, and
aiohttp's per-request machinery (URL and header objects, a stream reader, timers rescheduled per chunk)
was about a third of the triggerer's CPU while it watched a thousand predictions (benchmarks/RESULTS.md).
This client does only what the hook needs: requests to one host, one at a time per connection, over a
pool of keep-alive connections, with a connect timeout and a read timeout, TLS for ``https``. The answers
are parsed by httptools (llhttp, the parser behind uvicorn): nothing here parses HTTP by hand.

Through an ``http://`` proxy when one is given (the hook picks it in ``_route``, for the worker's requests
session too): an ``https`` host through a ``CONNECT`` tunnel, so the proxy never sees the key; an ``http``
one with absolute request targets.

Left out on purpose: redirects (never followed, so the key only ever goes to the connection's host),
``https://`` proxies, compression (never asked for), cookies.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
import ssl
import time
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

import httptools

__all__ = [
    "AnswerTimeout",
    "CertificateRejected",
    "ConnectFailed",
    "ConnectionLost",
    "ConnectionPool",
    "HTTPTransportError",
    "PoolClosed",
    "ProxyAuthRequired",
    "Response",
]

#: An answer larger than this is no CometAPI JSON object: the connection is dropped instead of buffering it.
MAX_BODY = 16 * 1024 * 1024
#: The same for the answer's headers, all together.
MAX_HEADERS = 64 * 1024
#: Idle connections are not reused after this long (aiohttp's default too): servers close idle keep-alive
#: connections after a while, and a request sent just as one closes fails.
IDLE_TIMEOUT = 15.0
#: A request that must not be sent twice (a create) reuses only a connection idle for less than this.
FRESH = 1.0
#: Idle connections kept at most; more are closed as they come back (a burst needs them only briefly).
MAX_IDLE = 128
#: A request whose deadline is this close when the read-timeout timer runs is timed out then.
_CLOCK_SLACK = 0.001


class Response(NamedTuple):
    """One answer: the status code, the headers (names lower-cased; a repeated one keeps its last value)
    and the whole body."""

    status: int
    headers: dict[str, str]
    body: bytes


class HTTPTransportError(Exception):
    """No complete answer came back. ``sent``: the request may have reached the server."""

    sent = True


class ConnectFailed(HTTPTransportError):
    """No connection could be made (refused, unknown host, TLS handshake, connect timeout): nothing was sent."""

    sent = False


class AnswerTimeout(HTTPTransportError):
    """The request was sent and no complete answer came within the read timeout."""


class ProxyAuthRequired(ConnectFailed):
    """The proxy answered ``CONNECT`` with 407: its credentials are missing or wrong (retrying cannot help)."""


class CertificateRejected(ConnectFailed):
    """The server's TLS certificate was not trusted (no CA that signed it, or another host's): nothing was sent."""


class PoolClosed(HTTPTransportError):
    """The pool was closed (its hook let go of it) before the request could be sent."""

    sent = False


class ConnectionLost(HTTPTransportError):
    """The connection closed before the answer was complete (or the answer was not valid HTTP)."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        #: Whether any byte of an answer had arrived (a keep-alive connection closed by the server just as it
        #: was reused has none).
        self.answered = answered


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection carrying one request at a time."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._header_size = 0
        self._refused: str | None = None  # why a callback refused the answer (httptools hides the reason)
        self._headers_done = False
        self._answered = False
        self.keep_alive = False
        self.closed = False
        self.idle_since = 0.0
        self.timeout = self.deadline = 0.0  # the request in flight's read timeout and its loop time

    # -- one exchange ------------------------------------------------------------------------------------

    def send(self, data: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Response]:
        self._waiter = loop.create_future()
        self._headers, self._body, self._size, self._header_size = {}, [], 0, 0
        self._headers_done = self._answered = self.keep_alive = False
        self._refused = None
        assert self.transport is not None
        self.transport.write(data)
        return self._waiter

    def time_out(self, seconds: float) -> None:
        self._fail(AnswerTimeout(f"no complete answer within {seconds:g} s"))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def _fail(self, error: HTTPTransportError) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        # A connection whose answer was not read to its end cannot carry another request.
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: this connection can no longer be trusted
            self._fail(ConnectionLost("the server sent data without a request", answered=True))
            return
        self._answered = True
        try:
            self._parser.feed_data(data)
        except Exception as error:  # noqa: BLE001 - httptools' parse errors, or a callback's below
            reason = self._refused or f"the answer is not valid HTTP ({error})"
            self._fail(ConnectionLost(reason, answered=True))

    def connection_lost(self, exc: Exception | None) -> None:
        closed_by_us, self.closed = self.closed, True
        self._pool._forget(self)
        if self._waiter is None:
            return
        if (
            self._headers_done
            and "content-length" not in self._headers
            and not self._chunked()
            and exc is None
            and not closed_by_us
        ):
            # No length and not chunked: the body is what came before the server closed it (RFC 9112, 6.3);
            # a reset, or our own close, cuts it off instead.
            self._complete()
            return
        reason = f" ({type(exc).__name__}: {exc})" if exc else ""
        what = "the answer was cut off" if self._answered else "the connection closed before any answer"
        self._fail(ConnectionLost(what + reason, answered=self._answered))

    # -- httptools callbacks -----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # An answer to no request (bytes after the last one): this connection is out of step for good.
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_size += len(name) + len(value)
        if self._header_size > MAX_HEADERS:
            self._refuse(f"the answer's headers are larger than {MAX_HEADERS} bytes")
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True
        length = self._headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            self._refuse(f"the answer is larger than {MAX_BODY} bytes")

    def on_body(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > MAX_BODY:
            self._refuse(f"the answer is larger than {MAX_BODY} bytes")
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        if 100 <= self._parser.get_status_code() < 200:
            # An interim answer (103 Early Hints from Cloudflare, 100 Continue): the real one follows.
            self._headers, self._body, self._size, self._header_size = {}, [], 0, 0
            self._headers_done = False
            return
        self.keep_alive = self._parser.should_keep_alive() and self._waiter is not None
        self._complete()

    # -- internals ---------------------------------------------------------------------------------------

    def _refuse(self, reason: str) -> None:
        # Raising stops the parser; feed_data then raises httptools' "User callback error", not this.
        self._refused = reason
        raise ValueError(reason)

    def _chunked(self) -> bool:
        return "chunked" in self._headers.get("transfer-encoding", "").lower()

    def _complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        response = Response(self._parser.get_status_code(), self._headers, b"".join(self._body))
        self._headers, self._body = {}, []  # the answer owns them now
        if waiter is not None and not waiter.done():
            waiter.set_result(response)


class ConnectionPool:
    """Keep-alive connections to one base URL, sending every request with the same default headers.

    :param base_url: ``scheme://host[:port][/path]``; request paths are appended to it.
    :param headers: Sent with every request (the key, the user agent).
    :param connect_timeout: Seconds to open a connection (TLS handshake included).
    :param read_timeout: Seconds from sending a request to the end of its answer, unless a request says.
    :param proxy: ``http://[user:password@]host[:port]`` to go through, or ``None``.
    :param verify: Check the server's certificate against the system's CAs (``True``), a CA bundle file or
        directory (a path), or not at all (``False``), as requests' ``verify``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        connect_timeout: float,
        read_timeout: float,
        proxy: str | None = None,
        verify: bool | str = True,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) base URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = _tls_context(verify) if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        self._proxy: tuple[str, int] | None = None
        self._tunnel: bytes | None = None  # the CONNECT request, for an https host behind a proxy
        head = f"Host: {parts.netloc}\r\n{_header_lines(headers)}"
        if proxy:
            self._proxy, credentials = _parse_proxy(proxy)
            if self._ssl is not None:
                target = f"{_bracketed(self._host)}:{self._port}"
                self._tunnel = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{credentials}\r\n".encode("latin-1")
            else:
                # Plain http through a proxy: absolute request targets, the proxy's credentials on each request.
                self._prefix = f"http://{parts.netloc}{self._prefix}"
                head += credentials
        self._head = head
        self._head.encode("latin-1")  # checked now: _header_lines refuses what cannot be sent
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: list[_Connection] = []  # most recently used last
        self._busy: set[_Connection] = set()
        # One timer for the read timeouts of every request in flight, at the earliest deadline (see _on_sweep).
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf
        self.closed = False

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        read_timeout: float | None = None,
        idempotent: bool = True,
    ) -> Response:
        """Send one request and return its whole answer (any status); raise :class:`HTTPTransportError`
        when none came back.

        :param idempotent: Whether sending it twice is harmless. Only then is a request that found its reused
            keep-alive connection closed under it (nothing came back) sent again, once, on a new connection;
            any other request reuses only a connection that was busy a moment ago (it cannot be sent again
            when that fails: it may have reached the server).
        """
        data = self._encode(method, path, body, headers)
        if self.closed:
            raise PoolClosed("the connection pool was closed")
        timeout = self._read_timeout if read_timeout is None else read_timeout
        conn = self._take_idle(IDLE_TIMEOUT if idempotent else FRESH)
        if conn is not None:
            try:
                return await self._exchange(conn, data, timeout)
            except ConnectionLost as error:
                if error.answered or not idempotent or self.closed:
                    raise
        return await self._exchange(await self._connect(), data, timeout)

    async def close(self) -> None:
        """Close every connection (idempotent); requests in flight fail."""
        self.closed = True
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep, self._sweep_at = None, math.inf

    # -- internals ---------------------------------------------------------------------------------------

    def _encode(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None) -> bytes:
        if method not in _METHODS or not _PATH.match(path):
            # HEAD would wait for a body that never comes; a space or line break in the path would change
            # the request (callers validate ids; this is the last line).
            raise ValueError(f"cannot send {method!r} {path!r}")
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._head}"
        if headers:
            head += _header_lines(headers)
        if body is not None or method not in ("GET", "HEAD"):
            head += f"Content-Length: {len(body or b'')}\r\n"
        data = (head + "\r\n").encode("latin-1")
        return data + body if body else data

    async def _exchange(self, conn: _Connection, data: bytes, timeout: float) -> Response:
        loop = asyncio.get_running_loop()
        conn.timeout, conn.deadline = timeout, loop.time() + timeout
        self._busy.add(conn)
        if conn.deadline < self._sweep_at:
            self._arm_sweep(loop, conn.deadline)
        try:
            response = await conn.send(data, loop)
        except BaseException:  # noqa: BLE001 - cancelled or failed: the answer may still come, on nothing
            conn.close()
            raise
        finally:
            self._busy.discard(conn)
        if conn.keep_alive and not conn.closed and not self.closed and len(self._idle) < MAX_IDLE:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        return response

    def _arm_sweep(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = at
        self._sweep = loop.call_at(at, self._on_sweep, loop)

    def _on_sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Time out the requests whose deadline has come; wait for the earliest of the others.

        Why not a timer per request: nearly every request is answered long before its read timeout (90 s by
        default), so a timer each is made and cancelled for nothing, thousands of times a minute in a
        triggerer, and the cancelled ones linger in the event loop's heap. This one fires about once per
        read timeout while requests keep coming, and times each out as exactly as a timer of its own would.
        """
        self._sweep, self._sweep_at = None, math.inf
        now = loop.time() + _CLOCK_SLACK  # asyncio may run a timer a hair before its time
        soonest = math.inf
        for conn in list(self._busy):
            if conn.deadline <= now:
                conn.time_out(conn.timeout)
            elif conn.deadline < soonest:
                soonest = conn.deadline
        if soonest < math.inf and not self.closed:
            self._arm_sweep(loop, soonest)

    def _take_idle(self, max_idle: float) -> _Connection | None:
        """The most recently used idle connection, if it has been idle under ``max_idle`` seconds."""
        idle = self._idle
        if not idle:
            return None
        now = time.monotonic()
        while idle and (idle[0].idle_since < now - IDLE_TIMEOUT or idle[0].closed):  # the oldest come first
            idle.pop(0).close()
        while idle and (idle[-1].closed or _closing(idle[-1])):  # closed before connection_lost has run
            idle.pop().close()
        if idle and idle[-1].idle_since >= now - max_idle:
            return idle.pop()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            if self._tunnel is not None:
                conn = await asyncio.wait_for(self._open_tunnel(loop), self._connect_timeout)
            else:
                host, port = self._proxy or (self._host, self._port)
                _, conn = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _Connection(self),
                        host,
                        port,
                        ssl=self._ssl,
                        server_hostname=self._host if self._ssl else None,
                        # Happy Eyeballs (RFC 8305), as aiohttp: where IPv6 silently drops packets, IPv4 is
                        # tried after 0.25 s instead of after the whole connect timeout.
                        happy_eyeballs_delay=0.25,
                        interleave=1,
                    ),
                    self._connect_timeout,
                )
        except asyncio.TimeoutError:
            raise ConnectFailed(f"connect to {self._where()} timed out after {self._connect_timeout:g} s") from None
        except ssl.SSLCertVerificationError as error:
            raise CertificateRejected(f"{self._where()}: {error}") from None
        except OSError as error:  # refused, unreachable, unknown host, TLS (ssl.SSLError is an OSError)
            raise ConnectFailed(f"cannot connect to {self._where()} ({type(error).__name__}: {error})") from None
        if self.closed:
            conn.close()
            raise PoolClosed("the connection pool was closed")
        return conn

    def _where(self) -> str:
        """The host (and proxy) a connect failure is about, for its message."""
        via = f" through the proxy {_bracketed(self._proxy[0])}:{self._proxy[1]}" if self._proxy else ""
        return f"{_bracketed(self._host)}:{self._port}{via}"

    async def _open_tunnel(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        """A TLS connection to the host through the proxy's ``CONNECT`` tunnel (the proxy sees no request)."""
        assert self._proxy is not None and self._tunnel is not None and self._ssl is not None
        transport, tunnel = await loop.create_connection(
            _TunnelAnswer, *self._proxy, happy_eyeballs_delay=0.25, interleave=1
        )
        try:
            transport.write(self._tunnel)
            line = (await tunnel.head).split(b"\r\n", 1)[0].decode("latin-1", "replace")
            match = _STATUS_LINE.match(line)
            if not match or not match[1].startswith("2"):  # any 2xx opens the tunnel (RFC 9110, 9.3.6)
                refused = f"the proxy refused the tunnel to {self._host}:{self._port} ({line[:200]})"
                raise (ProxyAuthRequired if match and match[1] == "407" else ConnectFailed)(refused)
            conn = _Connection(self)
            tls = await loop.start_tls(transport, conn, self._ssl, server_hostname=self._host)
            if tls is None:  # lost between the handshake and this line
                raise ConnectFailed("the tunnel closed right after the TLS handshake")
        except BaseException:
            transport.abort()
            raise
        conn.connection_made(tls)  # start_tls does not call it
        return conn

    def _forget(self, conn: _Connection) -> None:
        # Closed by the server while idle: never hand it out again.
        try:
            self._idle.remove(conn)
        except ValueError:
            pass


class _TunnelAnswer(asyncio.Protocol):
    """Reads the proxy's answer to ``CONNECT`` (its head only: nothing may follow before TLS starts)."""

    def __init__(self) -> None:
        self.head: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._buffer = b""

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if b"\r\n\r\n" in self._buffer and not self.head.done():
            self.head.set_result(self._buffer)
        elif len(self._buffer) > MAX_HEADERS and not self.head.done():
            self.head.set_exception(ConnectFailed("the proxy's answer to CONNECT is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectFailed("the proxy closed the connection before answering CONNECT"))


def _closing(conn: _Connection) -> bool:
    # The server's FIN can be read before connection_lost runs: a request written then goes nowhere.
    return conn.transport is None or conn.transport.is_closing()


_tls_contexts: dict[tuple[bool | str, str | None, str | None], ssl.SSLContext] = {}


def _tls_context(verify: bool | str = True) -> ssl.SSLContext:
    """The system's CAs (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` honoured), hostname checked, as aiohttp did;
    or the CA bundle (file or directory) ``verify`` names; or, with ``verify=False``, no check at all.

    Built once per CA setting: loading the CAs takes ~20 ms of the event loop, and a pool is rebuilt
    whenever its last hook let go of it or the key changed."""
    key = (verify, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    context = _tls_contexts.get(key)
    if context is None:
        if verify is True:
            context = ssl.create_default_context()
        elif verify is False:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif os.path.isdir(verify):
            context = ssl.create_default_context(capath=verify)
        else:
            context = ssl.create_default_context(cafile=verify)  # a missing file raises here, naming it
        _tls_contexts[key] = context
    return context


def _parse_proxy(proxy: str) -> tuple[tuple[str, int], str]:
    """``(host, port)`` of an ``http://`` proxy URL and its ``Proxy-Authorization`` header line (or "")."""
    parts = urlsplit(proxy)
    if parts.scheme.lower() != "http" or not parts.hostname:
        # Never the URL itself in the message: it may carry the proxy's password.
        raise ValueError(f"only http:// proxies are supported, got a {parts.scheme}:// one")
    credentials = ""
    if parts.username is not None:
        # Latin-1, as requests (urllib3) encodes the worker's proxy credentials.
        user, password = unquote(parts.username), unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode("latin-1", "replace")).decode()
        credentials = f"Proxy-Authorization: Basic {token}\r\n"
    return (parts.hostname, parts.port or 80), credentials


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
_STATUS_LINE = re.compile(r"HTTP/1\.[01] (\d{3})(?: |$)")
_PATH = re.compile(r"/[!-~]*\Z")  # printable ASCII, no spaces
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # a header name (RFC 9110, 5.6.2)


def _header_lines(headers: Mapping[str, str]) -> str:
    lines = []
    for name, value in headers.items():
        # Never the value in the message: it may be the key.
        if not _TOKEN.match(name):
            raise ValueError(f"{name!r} is not a header name")
        if any(c in value for c in "\r\n\0"):
            # A line break would let a value smuggle headers (or a second request) onto the connection.
            raise ValueError(f"header {name!r} holds a line break")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"header {name!r} holds characters HTTP cannot carry (not Latin-1)") from None
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)
