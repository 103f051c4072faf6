"""Both transports against HTTP software we did not write, on 127.0.0.1: Debian's squid (a forward proxy
with Basic credentials, tunnelling CONNECT) in front of nginx (TLS with a private CA's certificate, closing
idle keep-alive connections after a second) in front of the simulator.

Skipped where squid or nginx is not installed, with the reason; CI (``CI=true``) installs both
(.ci/run) and fails instead of skipping.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from airflow_comet.exceptions import CometAPIConfigError
from airflow_comet.hooks._settings_cache import forget_settings
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.testing import CometAPISimulator, Faults
from airflow_comet.triggers.prediction import PredictionTrigger
from tests import real_servers
from tests.conftest import API_KEY, get_prediction_through, set_connection

MODEL = "black-forest-labs/flux-schnell"
#: nginx closes a keep-alive connection idle this long.
NGINX_KEEPALIVE = 1.0


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    reason = real_servers.missing()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the tests against squid and nginx: {reason}")
        pytest.skip(reason)
    from benchmarks._tls_proxy import make_certificate

    cert, key = make_certificate(tmp_path_factory.mktemp("ca"))
    os.chmod(key, 0o644)  # nginx's master reads it; the directory is private to this test run anyway
    with CometAPISimulator(api_key=API_KEY, faults=Faults(durations=(2.5, 3.0))) as sim:
        with real_servers.Nginx(sim.port, cert, key, keepalive=NGINX_KEEPALIVE) as nginx:
            with real_servers.Squid("airflow", "p@ss word") as squid:
                yield sim, nginx, squid, cert


@pytest.fixture
def route(servers, monkeypatch):
    """``cometapi_default`` through squid (credentials in the proxy URL) to nginx, trusting its CA."""
    sim, nginx, squid, cert = servers
    set_connection(
        monkeypatch,
        nginx.url,
        proxies={"https": squid.url_with("airflow", "p%40ss%20word")},
        verify=str(cert),
    )
    monkeypatch.setenv("NO_PROXY", "")  # the proxy is meant for 127.0.0.1 here
    start = len(sim.requests)
    yield sim, lambda: sim.requests[start:]


def _endpoints(records) -> list[str]:
    return [r.endpoint for r in records]


def test_the_worker_creates_and_checks_through_squid_and_nginx(route):
    sim, seen = route
    hook = CometAPIHook()
    created = hook.create_prediction(MODEL, {"prompt": "a lighthouse"})
    time.sleep(NGINX_KEEPALIVE + 0.5)  # nginx closes the idle connection
    assert hook.get_prediction(created["id"])["id"] == created["id"]
    assert _endpoints(seen()) == ["create", "status"]


def test_the_triggerer_survives_idle_closes_without_a_failed_check_or_a_second_create(servers, route):
    sim, seen = route
    nginx = servers[1]
    before = len(nginx.requests())

    async def run() -> None:
        async with CometAPIHook() as hook:
            created = await hook.acreate_prediction(MODEL, {"prompt": "a lighthouse"})
            for _ in range(3):  # each check finds its kept-alive connection closed by nginx meanwhile
                await asyncio.sleep(NGINX_KEEPALIVE + 0.5)
                assert (await hook.aget_prediction(created["id"]))["id"] == created["id"]
            await asyncio.sleep(NGINX_KEEPALIVE + 0.5)
            await hook.acreate_prediction(MODEL, {"prompt": "a second one"})

    asyncio.run(run())
    assert _endpoints(seen()) == ["create", "status", "status", "status", "create"]
    assert all(r.status in (200, 201) for r in seen())
    # nginx really closed them: every request came on a connection of its own.
    deadline = time.monotonic() + 5
    while len(nginx.requests()) < before + 5 and time.monotonic() < deadline:  # its log line comes last
        time.sleep(0.05)
    served = nginx.requests()[before:]
    assert len(served) == 5 and len({connection for connection, _ in served}) == 5, served


def test_a_trigger_waits_through_squid_and_nginx_to_the_end(route):
    sim, seen = route
    created = CometAPIHook().create_prediction(MODEL, {"prompt": "a lighthouse"})

    async def run() -> dict:
        trigger = PredictionTrigger(created["id"], poll_interval=2.0, started_at=time.time())
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")

    event = asyncio.run(asyncio.wait_for(run(), 30))
    assert event["status"] == "succeeded", event["message"]
    records = seen()
    assert _endpoints(records)[0] == "create" and set(_endpoints(records)[1:]) == {"status"}
    assert len(records) >= 2


@pytest.mark.parametrize("mode", ["worker", "triggerer"])
def test_wrong_proxy_credentials_are_a_config_error_in_both(servers, monkeypatch, mode):
    sim, nginx, squid, cert = servers
    set_connection(monkeypatch, nginx.url, proxies={"https": squid.url_with("airflow", "wrong")}, verify=str(cert))
    monkeypatch.setenv("NO_PROXY", "")
    before = len(sim.requests)

    async def run() -> None:
        forget_settings("cometapi_default")
        with pytest.raises(CometAPIConfigError, match="407.*proxy's user name and password") as info:
            await get_prediction_through(mode)
        assert "wrong" not in str(info.value)

    asyncio.run(run())
    assert len(sim.requests) == before
