"""Proxies and certificate checks: the triggerer's transport reaches the API the way the worker's requests
session does (the connection's ``proxies`` / ``verify`` extras, ``HTTPS_PROXY`` and ``NO_PROXY``), through a
real forward proxy on 127.0.0.1 (tests/http_proxy.py)."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from airflow_comet.exceptions import CometAPIConfigError
from airflow_comet.hooks._http1 import ConnectFailed, ConnectionPool
from airflow_comet.hooks._protocol import ConnectionSettings
from airflow_comet.hooks.cometapi import CometAPIHook
from tests.http_proxy import HttpProxy
from tests.test_http1 import RawServer


def _settings(base_url: str, **extras: object) -> ConnectionSettings:
    class Conn:
        conn_id, host, port, password = "c", base_url, None, "k"

    return ConnectionSettings.from_connection(Conn(), extras)


@pytest.fixture
def tls_server_context(tmp_path):
    from benchmarks._tls_proxy import make_certificate

    cert, key = make_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


# -- choosing the proxy, as requests does -----------------------------------------------------------------


def test_the_environment_proxy_is_used_unless_no_proxy_or_trust_env_says_otherwise(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://corp-proxy:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    assert _settings("https://api.cometapi.com").proxy == "http://corp-proxy:3128"
    assert _settings("http://internal.example:8765").proxy is None  # not https, and bypassed anyway
    assert _settings("https://api.cometapi.com", trust_env=False).proxy is None
    monkeypatch.setenv("NO_PROXY", "api.cometapi.com")
    assert _settings("https://api.cometapi.com").proxy is None


def test_the_connections_proxies_extra_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://env-proxy:3128")
    assert _settings("https://api.cometapi.com", proxies={"https": "http://conn-proxy:8080"}).proxy == (
        "http://conn-proxy:8080"
    )
    assert _settings("https://api.cometapi.com", proxy="http://one:1").proxy == "http://one:1"


def test_a_proxy_that_cannot_be_used_is_a_config_error_without_its_password(monkeypatch):
    with pytest.raises(CometAPIConfigError, match="only http:// proxies") as info:
        _settings("https://api.cometapi.com", proxies={"https": "socks5://user:hunter2@proxy:1080"})
    assert "hunter2" not in str(info.value)
    with pytest.raises(CometAPIConfigError, match="proxies"):
        _settings("https://api.cometapi.com", proxies=["http://proxy:3128"])


def test_the_settings_never_show_the_proxy_password():
    settings = _settings("https://api.cometapi.com", proxies={"https": "http://user:hunter2@proxy:3128"})
    assert settings.proxy == "http://user:hunter2@proxy:3128"
    assert "hunter2" not in repr(settings)


@pytest.mark.parametrize(
    ("extras", "expected"),
    [({}, True), ({"verify": False}, False), ({"verify": "false"}, False), ({"verify_ssl": "True"}, True),
     ({"verify": "/etc/corp-ca.pem"}, "/etc/corp-ca.pem")],
)
def test_verify_is_read_as_requests_reads_it(extras, expected):
    assert _settings("https://api.cometapi.com", **extras).verify == expected


def test_a_verify_that_is_no_flag_nor_path_is_a_config_error():
    with pytest.raises(CometAPIConfigError, match="'verify'"):
        _settings("https://api.cometapi.com", verify=3)


# -- the transport through a proxy ------------------------------------------------------------------------


async def test_an_https_host_is_reached_through_a_connect_tunnel_the_proxy_cannot_read(tls_server_context):
    context, cert = tls_server_context
    async with RawServer(tls=context) as server, HttpProxy(credentials=("u", "p@ss")) as proxy:
        pool = ConnectionPool(
            server.url,
            headers={"Authorization": "Bearer sk-secret"},
            connect_timeout=2,
            read_timeout=5,
            proxy=proxy.url_with("u", "p%40ss"),
            verify=str(cert),
        )
        for _ in range(2):
            assert (await pool.request("GET", "/replicate/v1/predictions/p1")).status == 200
        await pool.close()
    port = server.url.rsplit(":", 1)[1]
    assert proxy.connects == [f"127.0.0.1:{port}"]  # one tunnel, kept alive for both requests
    assert server.requests[0].startswith(b"GET /replicate/v1/predictions/p1 HTTP/1.1\r\n")
    assert b"Proxy-Authorization" not in server.requests[0]  # the proxy's credentials end at the proxy
    assert b"sk-secret" not in bytes(proxy.seen[0])  # the key crossed the proxy encrypted


async def test_a_proxy_refusing_the_tunnel_is_a_connect_error_naming_its_answer(tls_server_context):
    context, cert = tls_server_context
    async with RawServer(tls=context) as server, HttpProxy(credentials=("u", "right")) as proxy:
        pool = ConnectionPool(
            server.url, headers={}, connect_timeout=2, read_timeout=5, proxy=proxy.url_with("u", "wrong"), verify=str(cert)
        )
        with pytest.raises(ConnectFailed, match="refused the tunnel.*407") as info:
            await pool.request("GET", "/x")
        await pool.close()
    assert "wrong" not in str(info.value)
    assert server.connections == 0


async def test_an_unreachable_proxy_is_named_in_the_error():
    pool = ConnectionPool("http://127.0.0.1:9", headers={}, connect_timeout=2, read_timeout=5, proxy="http://127.0.0.1:1")
    with pytest.raises(ConnectFailed, match="through the proxy 127.0.0.1:1"):
        await pool.request("GET", "/x")


async def test_verify_false_accepts_a_certificate_no_ca_signed(tls_server_context):
    context, _ = tls_server_context
    async with RawServer(tls=context) as server:
        pool = ConnectionPool(server.url, headers={}, connect_timeout=2, read_timeout=5, verify=False)
        assert (await pool.request("GET", "/x")).status == 200
        await pool.close()


def test_worker_and_triggerer_both_go_through_the_environment_proxy_to_the_simulator(sim, monkeypatch):
    monkeypatch.delenv("NO_PROXY")

    async def run() -> tuple[dict, dict]:
        async with HttpProxy() as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            # The worker's requests session (blocking: in a thread, while the proxy serves in this loop).
            created = await asyncio.to_thread(
                CometAPIHook().create_prediction, "black-forest-labs/flux-schnell", {"prompt": "through a proxy"}
            )
            async with CometAPIHook() as hook:  # the triggerer's transport
                status = await hook.aget_prediction(created["id"])
            seen = b"".join(bytes(s) for s in proxy.seen)
        assert b"POST http://127.0.0.1:" in seen and b"/replicate/v1/models/" in seen
        assert f"GET {sim.base_url}/replicate/v1/predictions/{created['id']} HTTP/1.1".encode() in seen
        return created, status

    created, status = asyncio.run(run())
    assert status["id"] == created["id"]
    assert [r.endpoint for r in sim.requests] == ["create", "status"]
