"""The async transport (hooks/_http1.py) against a raw TCP server on 127.0.0.1 that writes exact bytes.

The hook's behaviour over this transport (retries, errors, timeouts, the key) is tested in test_hook.py
against the scripted server and the simulator; here: what HTTP/1.1 itself can do to a client (chunked and
close-delimited bodies, answers cut off, keep-alive connections closed under a request, garbage, TLS).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable

import pytest

from airflow_comet.hooks import _http1
from airflow_comet.hooks._http1 import AnswerTimeout, ConnectFailed, ConnectionLost, ConnectionPool, PoolClosed

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\": 1}\r\n"

# A handler gets (reader, writer, index of the connection) and serves that connection.
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawServer:
    """``asyncio.start_server`` on 127.0.0.1; counts connections and the requests it read."""

    def __init__(self, handler: Handler | None = None, tls: ssl.SSLContext | None = None) -> None:
        # No handler: every connection answers each of its requests with OK.
        self.handler, self.tls = handler, tls
        self.connections = 0
        self.requests: list[bytes] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        # Handlers still waiting on a connection end here, not in the loop's teardown.
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await (self.handler or (lambda r, w, i: self.keep_answering(r, w)))(reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
            0,
        )
        request = head + (await reader.readexactly(length) if length else b"")
        self.requests.append(request)
        return request

    async def keep_answering(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes = OK) -> None:
        while True:
            await self.read_request(reader)
            writer.write(answer)
            await writer.drain()


def _pool(url: str, **kw: float) -> ConnectionPool:
    return ConnectionPool(
        url, headers={"Authorization": "Bearer k"}, connect_timeout=kw.get("connect", 2.0), read_timeout=kw.get("read", 5.0)
    )


async def test_requests_reuse_one_keep_alive_connection_and_send_the_default_headers():
    async with RawServer() as server:
        pool = _pool(server.url + "/base/")
        for _ in range(3):
            response = await pool.request("GET", "/replicate/v1/predictions/p1")
            assert (response.status, response.body) == (200, b'{"ok": 1}\r\n')
            assert response.headers["content-type"] == "application/json"
        await pool.close()
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"GET /base/replicate/v1/predictions/p1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.url.rsplit(':', 1)[1]}".encode() in first
    assert b"Authorization: Bearer k\r\n" in first
    assert b"Content-Length" not in first  # a GET without a body


async def test_a_post_sends_its_body_with_its_length_and_extra_headers():
    async with RawServer() as server:
        pool = _pool(server.url)
        await pool.request("POST", "/x", body=b'{"input": {}}', headers={"Prefer": "wait=5"}, idempotent=False)
        await pool.request("POST", "/cancel")
        await pool.close()
    created, cancelled = server.requests
    assert created.endswith(b'Prefer: wait=5\r\nContent-Length: 13\r\n\r\n{"input": {}}')
    assert b"Content-Length: 0\r\n" in cancelled  # a POST without a body still says so


async def test_a_chunked_answer_is_read_whole():
    server: RawServer
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n5\r\n: 1}\n\r\n0\r\n\r\n"

    async def handler(reader, writer, index):
        await server.keep_answering(reader, writer, chunked)

    async with RawServer(handler) as server:
        pool = _pool(server.url)
        assert (await pool.request("GET", "/x")).body == b'{"a": 1}\n'
        assert (await pool.request("GET", "/x")).body == b'{"a": 1}\n'
        await pool.close()
    assert server.connections == 1


async def test_an_answer_without_length_ends_when_the_server_closes():
    server: RawServer

    async def handler(reader, writer, index):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"id\": \"p1\"}")
        await writer.drain()

    async with RawServer(handler) as server:
        pool = _pool(server.url)
        assert (await pool.request("GET", "/x")).body == b'{"id": "p1"}'
        assert (await pool.request("GET", "/x")).body == b'{"id": "p1"}'
        await pool.close()
    assert server.connections == 2  # a closed connection is never reused


async def test_an_answer_without_length_cut_off_by_a_reset_is_an_error():
    async def handler(reader, writer, index):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n{\"status\": \"succ")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a RST
        writer.transport.abort()

    async with RawServer(handler) as server:
        pool = _pool(server.url)
        with pytest.raises(ConnectionLost, match="cut off"):
            await pool.request("GET", "/x")
        await pool.close()


async def test_interim_answers_are_skipped_and_the_real_one_is_returned():
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"

    async def handler(reader, writer, index):
        await server.keep_answering(reader, writer, early_hints + OK)

    async with RawServer(handler) as server:
        pool = _pool(server.url)
        for _ in range(2):  # and the connection stays in step for the next request
            response = await pool.request("GET", "/x")
            assert (response.status, response.body) == (200, b'{"ok": 1}\r\n')
        await pool.close()
    assert server.connections == 1


async def test_bytes_after_an_answer_take_the_connection_out_of_the_pool():
    async def handler(reader, writer, index):
        await server.keep_answering(reader, writer, OK + b"HTTP/1.1 200 OK\r\nContent-Le")

    async with RawServer(handler) as server:
        pool = _pool(server.url)
        assert (await pool.request("GET", "/x")).status == 200
        assert (await pool.request("GET", "/x")).status == 200  # on a new connection, not out of step
        await pool.close()
    assert server.connections == 2


async def test_a_closed_pool_refuses_requests_with_a_transport_error():
    async with RawServer() as server:
        pool = _pool(server.url)
        await pool.request("GET", "/x")
        await pool.close()
        with pytest.raises(PoolClosed) as info:
            await pool.request("GET", "/x")
    assert not info.value.sent
    assert server.connections == 1


async def test_an_answer_cut_off_is_an_error_saying_the_request_was_sent():
    server: RawServer

    async def handler(reader, writer, index):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"id\": ")
        await writer.drain()

    async with RawServer(handler) as server:
        pool = _pool(server.url)
        with pytest.raises(ConnectionLost, match="cut off") as info:
            await pool.request("GET", "/x")
        await pool.close()
    assert info.value.sent and info.value.answered


async def test_a_keep_alive_connection_closed_under_a_reused_request_is_retried_once_when_idempotent():
    server: RawServer

    async def handler(reader, writer, index):
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()
        if index == 0:
            await server.read_request(reader)  # the second request on the first connection: hang up on it
            return
        await server.keep_answering(reader, writer)

    async with RawServer(handler) as server:
        pool = _pool(server.url)
        await pool.request("GET", "/x")
        assert (await pool.request("GET", "/x")).status == 200
        await pool.close()
    assert server.connections == 2
    assert len(server.requests) == 3  # sent, lost, sent again on a new connection


async def test_a_create_is_never_sent_twice_when_its_connection_closes_under_it():
    server: RawServer

    async def handler(reader, writer, index):
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()
        await server.read_request(reader)  # hang up on the second request

    async with RawServer(handler) as server:
        pool = _pool(server.url)
        await pool.request("GET", "/x")
        with pytest.raises(ConnectionLost, match="before any answer") as info:
            await pool.request("POST", "/create", body=b"{}", idempotent=False)
        await pool.close()
    assert info.value.sent  # it may have reached the server: the hook reports an ambiguous create
    assert len(server.requests) == 2


async def test_a_create_does_not_reuse_a_connection_idle_for_long(monkeypatch):
    monkeypatch.setattr(_http1, "FRESH", 0.05)
    async with RawServer() as server:
        pool = _pool(server.url)
        await pool.request("GET", "/x")
        await asyncio.sleep(0.1)
        await pool.request("POST", "/create", body=b"{}", idempotent=False)
        await pool.request("GET", "/x")  # a GET still takes an idle connection
        await pool.close()
    assert server.connections == 2


async def test_idle_connections_expire(monkeypatch):
    monkeypatch.setattr(_http1, "IDLE_TIMEOUT", 0.05)
    async with RawServer() as server:
        pool = _pool(server.url)
        await pool.request("GET", "/x")
        await asyncio.sleep(0.1)
        await pool.request("GET", "/x")
        await pool.close()
    assert server.connections == 2


async def test_no_answer_within_the_read_timeout():
    server: RawServer

    async def handler(reader, writer, index):
        await server.read_request(reader)
        await asyncio.sleep(30)

    async with RawServer(handler) as server:
        pool = _pool(server.url, read=5.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(AnswerTimeout, match="0.2 s") as info:
            await pool.request("GET", "/x", read_timeout=0.2)
        assert 0.15 < loop.time() - started < 2
        assert info.value.sent
        await pool.close()


async def test_requests_in_flight_together_each_time_out_at_their_own_deadline():
    # One timer serves every request in flight: a later request with a shorter timeout must still time out
    # on time, an answered one must be left alone, and one sent after the timer last ran must time out too.
    server: RawServer

    async def handler(reader, writer, index):
        while True:
            request = await server.read_request(reader)
            if b"/fast" in request:
                await asyncio.sleep(0.1)
                writer.write(OK)
                await writer.drain()

    async with RawServer(handler) as server:
        pool = _pool(server.url, read=5.0)
        loop = asyncio.get_running_loop()

        async def timed(path: str, timeout: float) -> tuple[str, float]:
            started = loop.time()
            try:
                await pool.request("GET", path, read_timeout=timeout)
                outcome = "answered"
            except AnswerTimeout:
                outcome = "timed out"
            return outcome, loop.time() - started

        long_wait = asyncio.ensure_future(timed("/slow", 1.2))
        await asyncio.sleep(0.05)
        short, fast = await asyncio.gather(timed("/slow", 0.3), timed("/fast", 0.6))
        assert short[0] == "timed out" and 0.25 < short[1] < 0.8
        assert fast[0] == "answered"
        late = await timed("/slow", 0.2)
        assert late[0] == "timed out" and 0.15 < late[1] < 0.7
        outcome, took = await long_wait
        assert outcome == "timed out" and 1.1 < took < 1.8
        await pool.close()


async def test_a_refused_connection_says_nothing_was_sent():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    pool = _pool(f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectFailed) as info:
        await pool.request("POST", "/create", body=b"{}", idempotent=False)
    assert not info.value.sent


@pytest.mark.parametrize(
    "answer, match",
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not valid HTTP"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n" + b"x" * 65536, "larger than 1024 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n" + b"x" * 2048, "larger than 1024 bytes"),
    ],
    ids=["not-http", "too-large", "too-large-chunked"],
)
async def test_garbage_and_oversized_answers_are_errors(monkeypatch, answer, match):
    monkeypatch.setattr(_http1, "MAX_BODY", 1024)
    server: RawServer

    async def handler(reader, writer, index):
        await server.read_request(reader)
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(5)

    async with RawServer(handler) as server:
        pool = _pool(server.url)
        with pytest.raises(ConnectionLost, match=match):
            await pool.request("GET", "/x")
        await pool.close()


async def test_a_cancelled_request_closes_its_connection():
    server: RawServer
    hung_up = asyncio.Event()

    async def handler(reader, writer, index):
        if index > 0:
            await server.keep_answering(reader, writer)
        await server.read_request(reader)
        assert await reader.read() == b""  # nothing more comes: the client closed the connection
        hung_up.set()

    async with RawServer(handler) as server:
        pool = _pool(server.url)
        task = asyncio.create_task(pool.request("GET", "/slow"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Closed at once (its answer could still arrive, out of step), not left open until the pool closes.
        await asyncio.wait_for(hung_up.wait(), timeout=2)
        assert (await pool.request("GET", "/x")).body == b'{"ok": 1}\r\n'
        await pool.close()
    assert server.connections == 2


@pytest.mark.parametrize(
    "headers, match",
    [
        ({"Authorization": "Bearer sk-secret\r\nX-Evil: 1"}, "line break"),
        ({"Authorization": "Bearer sk-s\u00e9cret\u2019"}, "not Latin-1"),
        ({"Bad Name": "x"}, "not a header name"),
    ],
)
def test_headers_that_cannot_be_sent_are_refused_without_showing_the_value(headers, match):
    with pytest.raises(ValueError, match=match) as info:
        ConnectionPool("http://127.0.0.1:1", headers=headers, connect_timeout=1, read_timeout=1)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("method, path", [("HEAD", "/x"), ("GET", "/x y"), ("GET", "/x\r\nHost: evil"), ("GET", "x")])
async def test_requests_that_would_change_on_the_wire_are_refused(method, path):
    pool = _pool("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="cannot send"):
        await pool.request(method, path)


async def test_tls_verifies_the_server_certificate(tmp_path, monkeypatch):
    from benchmarks._tls_proxy import make_certificate

    cert, key = make_certificate(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    async with RawServer(tls=tls) as server:
        untrusting = _pool(server.url)  # the system's CAs do not know this self-signed certificate
        with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.request("GET", "/x")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusting = _pool(server.url)
        for _ in range(2):
            assert (await trusting.request("GET", "/x")).status == 200
        await trusting.close()
    assert server.connections == 1  # the refused handshake never got that far; one connection for both
