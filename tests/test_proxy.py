"""Proxies and certificate checks: the triggerer's transport (aiohttp) reaches the API the way the worker's
requests session does (the connection's ``proxies`` / ``verify`` extras, ``HTTPS_PROXY`` and ``NO_PROXY``),
through a forward proxy on 127.0.0.1 (tests/http_proxy.py; squid and nginx in test_real_servers.py)."""

from __future__ import annotations

import asyncio

import pytest

from airflow_comet.exceptions import CometAPIAmbiguousCreateError, CometAPIConfigError, CometAPITransportError
from airflow_comet.hooks._settings_cache import forget_settings
from airflow_comet.hooks._settings import ConnectionSettings
from airflow_comet.hooks.cometapi import CometAPIHook
from tests.conftest import get_prediction_through, set_connection
from tests.http_proxy import HttpProxy
from tests.raw_server import RawServer


def _settings(base_url: str, **extras: object) -> ConnectionSettings:
    class Conn:
        conn_id, host, port, password = "c", base_url, None, "k"

    return ConnectionSettings.from_connection(Conn(), extras)


# -- choosing the proxy, as requests does -----------------------------------------------------------------


def test_the_environment_proxy_is_used_unless_no_proxy_or_trust_env_says_otherwise(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://corp-proxy:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    assert _settings("https://api.cometapi.com").proxy == "http://corp-proxy:3128"
    assert _settings("https://internal.example:8765").proxy is None  # NO_PROXY
    assert _settings("https://api.cometapi.com", trust_env=False).proxy is None
    monkeypatch.setenv("NO_PROXY", "api.cometapi.com")
    assert _settings("https://api.cometapi.com").proxy is None


def test_the_connections_proxies_extra_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://env-proxy:3128")
    assert _settings("https://api.cometapi.com", proxies={"https": "http://conn-proxy:8080"}).proxy == (
        "http://conn-proxy:8080"
    )
    assert _settings("https://api.cometapi.com", proxy="http://one:1").proxy == "http://one:1"
    assert _settings("https://api.cometapi.com", proxy="one:1").proxy == "http://one:1"  # as requests reads it


def test_the_extras_no_proxy_sends_its_hosts_direct_and_others_through_the_proxy(monkeypatch):
    extras = {"proxies": {"https": "http://conn-proxy:8080", "no_proxy": "internal.example"}}
    assert _settings("https://internal.example", **extras).proxy is None
    assert _settings("https://api.cometapi.com", **extras).proxy == "http://conn-proxy:8080"


@pytest.mark.parametrize("scheme", ["socks5h", "socks4", "ftp"])
def test_a_proxy_neither_side_can_use_is_a_config_error_at_lookup_not_its_password(scheme):
    with pytest.raises(CometAPIConfigError, match=f"a {scheme}:// proxy; only http:// and https://") as info:
        _settings("https://api.cometapi.com", proxies={"https": f"{scheme}://user:hunter2@proxy:1080"})
    assert "hunter2" not in str(info.value)
    assert _settings("https://api.cometapi.com", proxy="HTTPS://proxy:3128").proxy == "HTTPS://proxy:3128"


def test_an_unreadable_proxy_url_is_a_config_error_that_shows_no_part_of_the_password():
    with pytest.raises(CometAPIConfigError, match="percent-encode") as info:
        _settings("https://api.cometapi.com", proxy="http://user:se/cret@proxy:3128")
    assert "cret" not in str(info.value) and "'se'" not in str(info.value)  # urllib's message quoted 'se'
    with pytest.raises(CometAPIConfigError, match="proxies"):
        _settings("https://api.cometapi.com", proxies=["http://proxy:3128"])


def test_the_settings_never_show_the_proxy_password():
    settings = _settings("https://api.cometapi.com", proxies={"https": "http://user:hunter2@proxy:3128"})
    assert settings.proxy == "http://user:hunter2@proxy:3128"
    assert "hunter2" not in repr(settings)


@pytest.mark.parametrize(
    ("extras", "expected"),
    [({}, True), ({"verify": False}, False), ({"verify": "false"}, False), ({"verify_ssl": "True"}, True),
     ({"verify": None}, True), ({"verify": 0}, False)],
)
def test_verify_flags(extras, expected):
    assert _settings("https://api.cometapi.com", **extras).verify == expected


def test_verify_takes_a_ca_bundle_path_or_requests_ca_bundle_and_names_a_missing_one(tmp_path, monkeypatch):
    bundle = tmp_path / "corp-ca.pem"
    bundle.write_text("")
    assert _settings("https://api.cometapi.com", verify=str(bundle)).verify == str(bundle)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    assert _settings("https://api.cometapi.com").verify == str(bundle)
    assert _settings("https://api.cometapi.com", trust_env=False).verify is True
    assert _settings("https://api.cometapi.com", verify=False).verify is False
    with pytest.raises(CometAPIConfigError, match=r"missing.pem.*extra 'verify'"):
        _settings("https://api.cometapi.com", verify=str(tmp_path / "missing.pem"))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "stale.pem"))
    with pytest.raises(CometAPIConfigError, match=r"stale.pem.*REQUESTS_CA_BUNDLE"):
        _settings("https://api.cometapi.com")
    assert _settings("http://127.0.0.1:8765").verify is True  # plain http: nothing to check, nothing to break
    with pytest.raises(CometAPIConfigError, match="'trust_env'"):
        _settings("https://api.cometapi.com", trust_env="sometimes")


# -- the transport through a proxy ------------------------------------------------------------------------


async def _get(monkeypatch, mode: str, url: str, **extras: object) -> dict:
    """One status check of ``p1`` through the worker's or the triggerer's transport, sent once."""
    set_connection(monkeypatch, url, max_retries=0, **extras)
    forget_settings("cometapi_default")  # the triggerer looks the connection up anew
    return await get_prediction_through(mode)


@pytest.mark.parametrize("mode", ["worker", "triggerer"])
@pytest.mark.parametrize("proxy_tls", [False, True], ids=["http-proxy", "https-proxy"])
def test_an_https_host_is_reached_through_a_tunnel_the_proxy_cannot_read(
    monkeypatch, tls_server_context, mode, proxy_tls
):
    context, cert = tls_server_context

    async def run() -> None:
        async with RawServer(tls=context) as server, HttpProxy(
            credentials=("u", "p@ss"), tls=context if proxy_tls else None
        ) as proxy:
            # The proxy's own certificate is checked against the same CAs as the host's.
            extras = {"proxies": {"https": proxy.url_with("u", "p%40ss")}, "verify": str(cert)}
            for _ in range(2):
                assert await _get(monkeypatch, mode, server.url, **extras) == {"ok": 1}
        port = server.url.rsplit(":", 1)[1]
        assert proxy.connects == [f"127.0.0.1:{port}"] * len(proxy.connects) and proxy.connects
        assert server.requests[0].startswith(b"GET /replicate/v1/predictions/p1 HTTP/1.1\r\n")
        assert b"proxy-authorization" not in server.requests[0].lower()  # the proxy's credentials end there
        assert all(b"SECRET" not in bytes(seen) for seen in proxy.seen)  # the key crossed it encrypted

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["worker", "triggerer"])
def test_an_unreachable_proxy_is_a_connection_failure_nothing_was_sent(monkeypatch, mode):
    async def run() -> None:
        with pytest.raises(CometAPITransportError, match="proxy") as info:
            await _get(monkeypatch, mode, "http://127.0.0.1:9", proxies={"http": "http://127.0.0.1:1"})
        assert not info.value.maybe_sent

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["worker", "triggerer"])
def test_an_http_host_gets_absolute_targets_and_the_proxys_credentials(monkeypatch, mode):
    async def run() -> None:
        async with RawServer() as server, HttpProxy(credentials=("u", "pw")) as proxy:
            for _ in range(2):
                await _get(monkeypatch, mode, server.url + "/base", proxies={"http": proxy.url_with("u", "pw")})
        assert server.requests
        for request in server.requests:
            assert request.startswith(f"GET {server.url}/base/replicate/v1/predictions/p1 HTTP/1.1\r\n".encode())
            assert b"proxy-authorization: basic dtpwdw==\r\n" in request.lower()

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["worker", "triggerer"])
def test_a_proxy_answering_407_for_an_http_host_is_a_config_error(monkeypatch, mode):
    async def run() -> None:
        async with RawServer() as server, HttpProxy(credentials=("u", "right")) as proxy:
            with pytest.raises(CometAPIConfigError, match="407.*proxy's user name and password"):
                await _get(monkeypatch, mode, server.url, proxies={"http": proxy.url_with("u", "wrong")})
        assert not server.requests

    asyncio.run(run())


@pytest.mark.parametrize("configured_by", ["environment", "extra"])
def test_worker_and_triggerer_take_the_same_proxy_to_the_simulator(sim, monkeypatch, configured_by):
    monkeypatch.delenv("NO_PROXY")

    async def run() -> tuple[dict, dict, bytes]:
        async with HttpProxy() as proxy:
            if configured_by == "environment":
                monkeypatch.setenv("HTTP_PROXY", proxy.url)
            else:  # the connection's extra wins over an environment proxy that goes nowhere
                monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")
                set_connection(monkeypatch, sim.base_url, proxies={"http": proxy.url})
            # The worker's requests session (blocking: in a thread, while the proxy serves in this loop).
            created = await asyncio.to_thread(
                CometAPIHook().create_prediction, "black-forest-labs/flux-schnell", {"prompt": "through a proxy"}
            )
            async with CometAPIHook() as hook:  # the triggerer's transport
                status = await hook.aget_prediction(created["id"])
        return created, status, b"".join(bytes(s) for s in proxy.seen)

    created, status, seen = asyncio.run(run())
    assert status["id"] == created["id"]
    assert f"POST {sim.base_url}/replicate/v1/models/black-forest-labs/flux-schnell/predictions".encode() in seen
    assert f"GET {sim.base_url}/replicate/v1/predictions/{created['id']} HTTP/1.1".encode() in seen
    assert [r.endpoint for r in sim.requests] == ["create", "status"]


@pytest.mark.parametrize("mode", ["worker", "triggerer"])
def test_a_proxy_asking_for_credentials_is_a_config_error_not_retried(monkeypatch, tls_server_context, mode):
    context, cert = tls_server_context

    async def run() -> None:
        async with RawServer(tls=context) as server, HttpProxy(credentials=("u", "right")) as proxy:
            set_connection(monkeypatch, server.url, proxies={"https": proxy.url_with("u", "wrong")}, verify=str(cert))
            with pytest.raises(CometAPIConfigError, match="407.*proxy's user name and password") as info:
                await get_prediction_through(mode)
            assert len(proxy.seen) == 1  # not retried: new credentials are needed, not time
            assert server.connections == 0

    asyncio.run(run())


@pytest.mark.parametrize(
    ("extras", "env_bundle", "trusted"),
    [
        ({"verify": "CERT"}, None, True),  # the extra's CA bundle
        ({}, "CERT", True),  # REQUESTS_CA_BUNDLE
        ({"trust_env": False}, "CERT", False),  # the environment ignored: certifi's CAs do not know the cert
        ({"verify": False}, "/nonexistent.pem", True),  # no check at all, whatever the environment says
    ],
)
def test_the_workers_tls_check_through_a_tunnel_follows_the_settings(
    monkeypatch, tls_server_context, extras, env_bundle, trusted
):
    context, cert = tls_server_context
    extras = {k: (str(cert) if v == "CERT" else v) for k, v in extras.items()}
    if env_bundle:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert) if env_bundle == "CERT" else env_bundle)

    async def run() -> None:
        async with RawServer(tls=context) as server, HttpProxy() as proxy:
            set_connection(monkeypatch, server.url, proxies={"https": proxy.url}, max_retries=0, **extras)
            call = asyncio.to_thread(CometAPIHook().test_connection)
            if trusted:
                ok, message = await call
                assert ok, message
                assert server.requests and proxy.connects  # through the tunnel, answered
            else:
                ok, message = await call
                assert not ok and "CERTIFICATE_VERIFY_FAILED" in message and "'verify'" in message, message
                assert not server.requests

    asyncio.run(run())


# -- a certificate nobody vouches for: a setting to change, not an outage to wait out --------------------


@pytest.mark.parametrize("mode", ["worker", "triggerer"])
def test_a_rejected_certificate_is_a_config_error_naming_the_verify_extra(
    monkeypatch, caplog, capsys, tls_server_context, mode
):
    context, _ = tls_server_context

    async def run() -> None:
        async with RawServer(tls=context) as server:
            set_connection(monkeypatch, server.url, max_retries=3)  # certifi's / the system's CAs: not this one
            with pytest.raises(CometAPIConfigError) as info:
                if mode == "worker":
                    await asyncio.to_thread(CometAPIHook().create_prediction, "o/m", {"prompt": "x"})
                else:
                    async with CometAPIHook() as hook:
                        await hook.acreate_prediction("o/m", {"prompt": "x"})
            message = str(info.value)
            assert "CERTIFICATE_VERIFY_FAILED" in message and "'verify'" in message and server.url in message
            assert not isinstance(info.value, CometAPIAmbiguousCreateError)
            assert not server.requests  # the handshake failed: nothing was sent

    asyncio.run(run())
    # Not retried: a missing CA is not fixed by waiting (Airflow 3 logs through structlog to stdout).
    logged = caplog.text + capsys.readouterr().out
    assert "retry" not in logged
