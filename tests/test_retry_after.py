"""A ``Retry-After`` that is neither a non-negative number of seconds nor an HTTP date is ignored, on every
path that reads one: the worker's create, status check and cancel, the triggerer's (the hook's async
methods and a PredictionTrigger), and output downloads. The retry policy's own backoff applies instead.

``nan`` used to reach ``time.sleep`` (a ValueError that failed the task) and ``inf`` a wait of
``max_retry_wait``, with every trigger of the connection paused as long."""

from __future__ import annotations

import asyncio
import email.utils
import io
import logging

import pytest

from airflow_comet.exceptions import CometAPIResponseError
from airflow_comet.hooks._protocol import parse_retry_after
from airflow_comet.hooks._ratelimit import request_budget
from airflow_comet.hooks._retry import RetryPolicy
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet._address_guard import AddressPolicy
from airflow_comet.outputs import download, plain_session, with_retries
from airflow_comet.triggers.prediction import PredictionTrigger
from tests.conftest import set_connection
from tests.scripted_server import Answer, ScriptedServer, envelope, prediction
from tests.test_trigger import events

BAD_VALUES = ["nan", "NaN", "inf", "-inf", "Infinity", "-5", "-0.5", "1e3", "0x10", "soon", "5 s", "1_0"]
#: Long enough that honouring a bad value (``inf`` capped at it) shows; the backoff is 0.05 s.
MAX_RETRY_WAIT = 5
FLUX = "black-forest-labs/flux-schnell"


@pytest.mark.parametrize("value", BAD_VALUES)
def test_a_value_that_is_not_seconds_nor_a_date_is_ignored(value):
    assert parse_retry_after(value, cap=60) is None


@pytest.mark.parametrize(
    ("value", "seconds"), [("0", 0.0), ("3", 3.0), (" 7 ", 7.0), ("1.5", 1.5), ("86400", 60.0)]
)
def test_seconds_are_read_and_capped(value, seconds):
    assert parse_retry_after(value, cap=60) == seconds


def test_an_http_date_is_read_relative_to_now_and_a_past_one_means_now():
    now = 1_800_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 12, usegmt=True), cap=60, now=now) == 12.0
    assert parse_retry_after(email.utils.formatdate(now - 12, usegmt=True), cap=60, now=now) == 0.0
    assert parse_retry_after("Sun, 32 Foo 2026 99:00:00 GMT", cap=60, now=now) is None


@pytest.fixture
def server(scripted, monkeypatch) -> ScriptedServer:
    set_connection(monkeypatch, scripted.url, max_retry_wait=MAX_RETRY_WAIT)
    return scripted


def _throttled(value: str, then: Answer) -> tuple[Answer, Answer]:
    return Answer(429, envelope("slow down", "rate_limit_exceeded"), headers={"Retry-After": value}), then


def _gap(server: ScriptedServer) -> float:
    first, second = server.seen
    return second.at - first.at


WORKER_CALLS = {
    "create": (lambda hook: hook.create_prediction(FLUX, {"prompt": "a paper boat"}), Answer(201, prediction())),
    "status": (lambda hook: hook.get_prediction("p1"), Answer(200, prediction(status="processing"))),
    "cancel": (lambda hook: hook.cancel_prediction("p1"), Answer(200, prediction(status="canceled"))),
}


@pytest.mark.parametrize("call", WORKER_CALLS)
@pytest.mark.parametrize("value", ["nan", "inf", "-5", "soon"])
def test_worker_requests_retry_after_their_own_backoff(server, call, value):
    send, answer = WORKER_CALLS[call]
    server.script(*_throttled(value, answer))
    assert send(CometAPIHook())["id"] == "p1"
    assert len(server.seen) == 2
    assert _gap(server) < 2  # the 0.05 s backoff, not max_retry_wait


@pytest.mark.parametrize("value", ["nan", "inf", "-5"])
def test_the_worker_error_carries_no_retry_after(server, value):
    server.script(Answer(429, envelope("slow down"), headers={"Retry-After": value}))
    with pytest.raises(CometAPIResponseError) as info:
        CometAPIHook(retry_policy=RetryPolicy(max_retries=0)).get_prediction("p1")
    assert info.value.status_code == 429 and info.value.retry_after is None


ASYNC_CALLS = {
    "create": (lambda hook: hook.acreate_prediction(FLUX, {"prompt": "a paper boat"}), Answer(201, prediction())),
    "status": (lambda hook: hook.aget_prediction("p1"), Answer(200, prediction(status="processing"))),
    "cancel": (lambda hook: hook.acancel_prediction("p1"), Answer(200, prediction(status="canceled"))),
}


@pytest.mark.parametrize("call", ASYNC_CALLS)
@pytest.mark.parametrize("value", ["nan", "inf", "-5"])
async def test_async_requests_retry_after_their_own_backoff_and_pause_nobody(server, call, value):
    send, answer = ASYNC_CALLS[call]
    server.script(*_throttled(value, answer))
    async with CometAPIHook() as hook:
        assert (await asyncio.wait_for(send(hook), 10))["id"] == "p1"
        # The connection's other triggers were not held back by the bad value either.
        assert request_budget("cometapi_default", None).paused_for() == 0
    assert _gap(server) < 2


@pytest.mark.parametrize("value", ["nan", "inf", "-5"])
async def test_a_trigger_polls_again_on_its_own_schedule(scripted, monkeypatch, value):
    # The shared poller sends each check once and schedules the next itself (about 2 s after a failed
    # one): a bad Retry-After must not set that schedule (inf used to hold it for max_retry_wait).
    set_connection(monkeypatch, scripted.url, max_retry_wait=20)
    succeeded = prediction(status="succeeded", output=["https://x.example/a.png"])
    scripted.script(*_throttled(value, Answer(200, succeeded)))
    [event] = await events(PredictionTrigger("p1", poll_interval=30), limit=25)
    assert event["status"] == "succeeded"
    assert _gap(scripted) < 10


@pytest.mark.parametrize("value", ["nan", "inf", "-5"])
def test_a_download_retries_after_its_own_backoff(value):
    image = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    with ScriptedServer() as host:
        host.script(
            Answer(429, "slow down", headers={"Retry-After": value}),
            Answer(200, image, content_type="image/png"),
        )
        sink = io.BytesIO()
        done = with_retries(
            lambda: download(plain_session(AddressPolicy(allow_loopback=True)), f"{host.url}/out.png", lambda _ext: sink, accepted=("image/png",), max_bytes=1024),
            policy=RetryPolicy(max_retries=2, backoff_base=0.05, max_retry_wait=MAX_RETRY_WAIT),
            logger=logging.getLogger(__name__),
            what="download",
        )
        assert done.size == len(image) and sink.getvalue() == image
        assert _gap(host) < 2
