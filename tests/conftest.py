"""Shared fixtures: real HTTP servers on 127.0.0.1 and CometAPI connections pointing at them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from tests.scripted_server import ScriptedServer

API_KEY = "sk-test-SECRET-0123456789"

#: Fast retries for tests: the policy is the same, only the first backoff is shorter.
FAST_EXTRAS = {"retry_backoff": 0.05, "max_retries": 4, "read_timeout": 5, "connect_timeout": 2}


def set_connection(monkeypatch: pytest.MonkeyPatch, host: str, *, key: str = API_KEY, conn_id: str = "cometapi_default", **extra: object) -> None:
    """Point a CometAPI connection at ``host`` through an ``AIRFLOW_CONN_...`` variable."""
    conn = {"conn_type": "cometapi", "password": key, "host": host, "extra": {**FAST_EXTRAS, **extra}}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


async def get_prediction_through(mode: str, prediction_id: str = "p1") -> dict:
    """One status check through the worker's transport (``mode == "worker"``, in a thread) or the triggerer's."""
    from airflow_comet.hooks.cometapi import CometAPIHook

    if mode == "worker":
        return await asyncio.to_thread(CometAPIHook().get_prediction, prediction_id)
    async with CometAPIHook() as hook:
        return await hook.aget_prediction(prediction_id)


@pytest.fixture
def tls_server_context(tmp_path):
    """A server-side TLS context for 127.0.0.1 with a self-signed certificate: ``(context, cert path)``."""
    import ssl

    from benchmarks._tls_proxy import make_certificate

    cert, key = make_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedServer]:
    with ScriptedServer() as server:
        set_connection(monkeypatch, server.url)
        yield server


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # Loopback only: a proxy from the environment must never see test traffic.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy", "no_proxy",
                 "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch):
    """The built-in CometAPI simulator with fast predictions, and ``cometapi_default`` pointing at it."""
    from airflow_comet.testing import CometAPISimulator, Faults

    with CometAPISimulator(api_key=API_KEY, faults=Faults(durations=(0.3, 1.0))) as simulator:
        set_connection(monkeypatch, simulator.base_url)
        yield simulator


@pytest.fixture
def simulator(monkeypatch: pytest.MonkeyPatch):
    """The simulator with predictions that never finish (for tests of the transport and budget, not of
    the outcome), and ``cometapi_default`` pointing at it."""
    from airflow_comet.testing import CometAPISimulator, Faults

    with CometAPISimulator(api_key=API_KEY, faults=Faults(never_finish=True)) as simulator:
        set_connection(monkeypatch, simulator.base_url)
        yield simulator


def create_running_prediction() -> str:
    """Create a prediction through ``cometapi_default`` (the worker's transport) and return its id."""
    from airflow_comet.hooks.cometapi import CometAPIHook

    return CometAPIHook().create_prediction("black-forest-labs/flux-schnell", {"prompt": "a lighthouse"})["id"]
