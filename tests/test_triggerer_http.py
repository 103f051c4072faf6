"""The triggerer's transport (hooks/_triggerer_http.py): one aiohttp session per connection and event loop,
shared by every hook, against the simulator and a raw TCP server on 127.0.0.1 that writes exact bytes.

The hook's behaviour over it (retries, errors, the key) is tested in test_hook.py; here: the sharing, and
what HTTP/1.1 itself can do to a client (keep-alive connections closed by the server, answers cut off,
compression, garbage, TLS).
"""

from __future__ import annotations

import asyncio
import gzip
import ssl

import pytest

from airflow_comet.exceptions import CometAPIAmbiguousCreateError, CometAPIConfigError, CometAPITransportError
from airflow_comet.hooks import _triggerer_http
from airflow_comet.hooks._per_loop import loop_state
from airflow_comet.hooks._settings_cache import forget_settings
from airflow_comet.hooks.cometapi import CometAPIHook
from tests.conftest import API_KEY, create_running_prediction, get_prediction_through, set_connection
from tests.raw_server import OK, RawServer

MODEL = "black-forest-labs/flux-schnell"


def _sessions() -> list[_triggerer_http._Shared]:
    """The shared sessions of the running loop."""
    return [v for k, v in loop_state().items() if isinstance(k, tuple) and k[0] == "session"]


def _one_shot(monkeypatch: pytest.MonkeyPatch, url: str, **extras: object) -> None:
    """``cometapi_default`` at ``url``, each request sent once (no retry hides what the transport did)."""
    set_connection(monkeypatch, url, max_retries=0, **extras)


# -- one session per connection and event loop ------------------------------------------------------------


def test_hooks_of_one_connection_share_one_session(simulator):
    pid = create_running_prediction()
    opened_before = simulator.connections_opened("api")

    async def run() -> None:
        hooks = [CometAPIHook() for _ in range(20)]
        for hook in hooks:
            await hook.__aenter__()
        assert len({id(hook._lease._shared) for hook in hooks}) == 1
        try:
            for _ in range(3):
                for hook in hooks:  # one after another: one keep-alive connection serves them all
                    await hook.aget_prediction(pid)
        finally:
            for hook in hooks:
                await hook.aclose()

    asyncio.run(run())
    assert len(simulator.polls(pid)) == 60
    assert simulator.connections_opened("api") - opened_before == 1


def test_closing_one_hook_leaves_the_session_open_for_the_others(simulator):
    pid = create_running_prediction()

    async def run() -> None:
        first, second = CometAPIHook(), CometAPIHook()
        async with first:
            async with second:
                shared = second._lease._shared
                await second.aget_prediction(pid)
            assert not shared.closed  # second let go; first still uses it
            await first.aget_prediction(pid)
        assert shared.closed and shared.session.closed  # the last user let go
        assert not _sessions()

        async with CometAPIHook() as third:  # a hook arriving afterwards gets a fresh session
            assert third._lease._shared is not shared
            await third.aget_prediction(pid)

    asyncio.run(run())
    assert [r.status for r in simulator.polls(pid)] == [200, 200, 200]


def test_a_cancelled_trigger_gives_its_share_back(simulator):
    pid = create_running_prediction()

    async def run() -> None:
        started = asyncio.Event()

        async def wait_forever() -> None:
            async with CometAPIHook() as hook:
                await hook.aget_prediction(pid)
                started.set()
                await asyncio.sleep(3600)

        async with CometAPIHook() as survivor:
            task = asyncio.create_task(wait_forever())
            await started.wait()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            [shared] = _sessions()
            assert shared.users == 1
            await survivor.aget_prediction(pid)
        assert not _sessions()

    asyncio.run(run())


def test_connections_with_other_keys_or_hosts_do_not_share(simulator, monkeypatch):
    set_connection(monkeypatch, simulator.base_url, conn_id="cometapi_other")

    async def run() -> None:
        async with CometAPIHook() as one, CometAPIHook("cometapi_other") as other:
            assert one._lease._shared is not other._lease._shared

    asyncio.run(run())


def test_each_event_loop_gets_its_own_session(simulator):
    pid = create_running_prediction()
    hook = CometAPIHook()
    sessions = []

    async def run() -> None:
        # The same hook in two loops: the first loop's lease is forgotten, not used (it would wait for ever).
        await hook.aget_prediction(pid)
        sessions.append(hook._lease._shared.session)

    asyncio.run(run())
    asyncio.run(run())
    assert sessions[0] is not sessions[1]
    assert len(simulator.polls(pid)) == 2


def test_direct_callers_share_at_most_max_connections(monkeypatch):
    # No shared poller in front: a hundred hooks asking at once still open at most MAX_CONNECTIONS.
    monkeypatch.setattr(_triggerer_http, "MAX_CONNECTIONS", 8)
    open_now = peak = 0

    async def handler(reader, writer, index):
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        try:
            while True:
                await server.read_request(reader)
                await asyncio.sleep(0.05)
                writer.write(OK)
                await writer.drain()
        finally:
            open_now -= 1

    async def run() -> None:
        global server
        async with RawServer(handler) as server:
            _one_shot(monkeypatch, server.url)
            hooks = [CometAPIHook() for _ in range(100)]
            await asyncio.gather(*(hook.aget_prediction("p1") for hook in hooks))
            for hook in hooks:
                await hook.aclose()
            assert server.connections <= 8

    asyncio.run(run())
    assert 1 < peak <= 8


# -- what a server can do to it -----------------------------------------------------------------------------


async def test_requests_send_the_key_and_accept_compressed_answers(monkeypatch):
    body = b'{"id": "p1", "status": "processing"}'
    compressed = gzip.compress(body)
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        + f"Content-Length: {len(compressed)}\r\n\r\n".encode()
        + compressed
    )

    async def handler(reader, writer, index):
        await server.keep_answering(reader, writer, answer)

    async with RawServer(handler) as server:
        _one_shot(monkeypatch, server.url + "/base/")
        async with CometAPIHook() as hook:
            for _ in range(2):
                assert (await hook.aget_prediction("p1"))["status"] == "processing"
    assert server.connections == 1  # kept alive between the two
    first = server.requests[0].lower()
    assert first.startswith(b"get /base/replicate/v1/predictions/p1 http/1.1\r\n")
    assert f"authorization: bearer {API_KEY}".lower().encode() in first
    assert b"accept-encoding: gzip" in first  # a compressing proxy's answers are read, not "bad answers"


async def test_a_keep_alive_connection_the_server_closed_is_never_a_failed_check(monkeypatch):
    # The server hangs up on the second request of each connection, as one does that closes idle connections
    # just as a request is written on one: the check is sent again on a new connection, once.
    async def handler(reader, writer, index):
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()
        await server.read_request(reader)

    async with RawServer(handler) as server:
        _one_shot(monkeypatch, server.url)
        async with CometAPIHook() as hook:
            for _ in range(3):
                assert await hook.aget_prediction("p1") == {"ok": 1}
    assert server.connections == len(server.requests) - 2  # each reused connection lost one request


async def test_a_create_goes_on_a_fresh_connection_and_is_never_sent_twice(monkeypatch):
    creates = []

    async def handler(reader, writer, index):
        request = await server.read_request(reader)
        if request.startswith(b"POST"):
            creates.append(index)
            return  # the create's connection closes without an answer: it may have been billed
        writer.write(OK)
        await writer.drain()
        await server.read_request(reader)  # and any request reusing this connection is lost

    async with RawServer(handler) as server:
        set_connection(monkeypatch, server.url)  # retries allowed: still one create
        async with CometAPIHook() as hook:
            await hook.aget_prediction("p1")
            with pytest.raises(CometAPIAmbiguousCreateError):
                await hook.acreate_prediction(MODEL, {"prompt": "x"})
    assert len(creates) == 1
    assert creates == [1]  # not the status check's kept-alive connection


async def test_idle_connections_are_dropped_after_the_keep_alive_time(monkeypatch):
    monkeypatch.setattr(_triggerer_http, "KEEPALIVE", 0.05)
    async with RawServer() as server:
        _one_shot(monkeypatch, server.url)
        async with CometAPIHook() as hook:
            await hook.aget_prediction("p1")
            await asyncio.sleep(0.2)
            await hook.aget_prediction("p1")
    assert server.connections == 2


async def test_no_answer_within_the_read_timeout_is_an_error_saying_it_was_sent(monkeypatch):
    async def handler(reader, writer, index):
        await server.read_request(reader)
        await asyncio.sleep(30)

    async with RawServer(handler) as server:
        _one_shot(monkeypatch, server.url, read_timeout=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with CometAPIHook() as hook:
            with pytest.raises(CometAPITransportError, match="no complete answer") as info:
                await hook.aget_prediction("p1")
        assert 0.25 < loop.time() - started < 2
    assert info.value.maybe_sent


async def test_a_refused_connection_says_nothing_was_sent(monkeypatch):
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    _one_shot(monkeypatch, f"http://127.0.0.1:{port}")
    async with CometAPIHook() as hook:
        with pytest.raises(CometAPITransportError, match="connection failed") as info:
            await hook.aget_prediction("p1")
    assert not info.value.maybe_sent


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "no complete answer"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", "no complete answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n" + b"x" * 65536, "larger than 1024 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n" + b"x" * 2048, "larger than 1024 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"id\": ", "no complete answer"),
    ],
    ids=["not-http", "huge-header", "too-large", "too-large-chunked", "cut-off"],
)
async def test_garbage_oversized_and_cut_off_answers_are_transport_errors(monkeypatch, answer, match):
    monkeypatch.setattr(_triggerer_http, "MAX_BODY", 1024)

    async def handler(reader, writer, index):
        await server.read_request(reader)
        writer.write(answer)
        await writer.drain()
        if b"Content-Length: 100\r\n" not in answer:
            await asyncio.sleep(5)

    async with RawServer(handler) as server:
        _one_shot(monkeypatch, server.url)
        async with CometAPIHook() as hook:
            with pytest.raises(CometAPITransportError, match=match) as info:
                await hook.aget_prediction("p1")
    assert info.value.maybe_sent


async def test_a_cancelled_check_closes_its_connection(monkeypatch):
    hung_up = asyncio.Event()

    async def handler(reader, writer, index):
        if index > 0:
            await server.keep_answering(reader, writer)
        await server.read_request(reader)
        assert await reader.read() == b""  # nothing more comes: the client closed the connection
        hung_up.set()

    async with RawServer(handler) as server:
        _one_shot(monkeypatch, server.url)
        async with CometAPIHook() as hook:
            task = asyncio.create_task(hook.aget_prediction("slow"))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Closed at once (its answer could still arrive, out of step), not left open for the next check.
            await asyncio.wait_for(hung_up.wait(), timeout=2)
            assert await hook.aget_prediction("p1") == {"ok": 1}
    assert server.connections == 2


# -- TLS: the same CAs and client certificate as the worker's ----------------------------------------------


@pytest.mark.parametrize("mode", ["worker", "triggerer"])
def test_tls_trusts_certifi_or_the_verify_bundle_never_ssl_cert_file(monkeypatch, tls_server_context, mode):
    context, cert = tls_server_context
    # The system store's variable: honoured by neither side, so that a CA trusted by one is trusted by both.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))

    async def check(**extras: object) -> tuple[bool, str]:
        set_connection(monkeypatch, server.url, max_retries=0, **extras)
        forget_settings("cometapi_default")  # looked up anew in this loop, not the last check's
        if mode == "worker":
            return await asyncio.to_thread(CometAPIHook().test_connection)
        async with CometAPIHook() as hook:
            try:
                await hook.aget_prediction("p1")
            except CometAPIConfigError as error:
                return False, str(error)
        return True, ""

    async def run() -> None:
        global server
        async with RawServer(tls=context) as server:
            ok, message = await check()
            assert not ok and "CERTIFICATE_VERIFY_FAILED" in message and "'verify'" in message, message
            assert (await check(verify=str(cert)))[0]
            assert (await check(verify=False))[0]

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["worker", "triggerer"])
def test_the_cert_extra_presents_a_client_certificate_in_both(monkeypatch, tmp_path, tls_server_context, mode):
    from benchmarks._tls_proxy import make_certificate

    context, cert = tls_server_context
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    client_cert, client_key = make_certificate(client_dir)
    context.verify_mode = ssl.CERT_REQUIRED  # the server wants a client certificate this CA signed
    context.load_verify_locations(client_cert)

    async def check(**extras: object) -> bool:
        set_connection(monkeypatch, server.url, max_retries=0, verify=str(cert), **extras)
        forget_settings("cometapi_default")
        try:
            await get_prediction_through(mode)
        except CometAPITransportError:
            return False
        return True

    async def run() -> None:
        global server
        async with RawServer(tls=context) as server:
            assert not await check()
            assert await check(cert=[str(client_cert), str(client_key)])

    asyncio.run(run())


def test_a_missing_client_certificate_file_is_a_config_error_at_lookup(monkeypatch, tmp_path):
    set_connection(monkeypatch, "https://api.cometapi.com", cert=str(tmp_path / "missing.pem"))
    with pytest.raises(CometAPIConfigError, match="missing.pem"):
        CometAPIHook().settings  # noqa: B018
