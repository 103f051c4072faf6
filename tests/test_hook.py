"""The hook against a real scripted HTTP server: requests, the retry taxonomy, timeouts, non-JSON answers."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import socket
import time

import pytest
from requests_toolbelt.adapters.socket_options import TCPKeepAliveAdapter

from airflow_comet.exceptions import (
    CometAPIAmbiguousCreateError,
    CometAPIAuthError,
    CometAPIConfigError,
    CometAPINotFoundError,
    CometAPINotJSONError,
    CometAPIResponseError,
    CometAPITransportError,
)
from airflow_comet.hooks.cometapi import CometAPIHook
from tests.conftest import API_KEY, set_connection
from tests.scripted_server import Answer, envelope, prediction

MODES = ["sync", "async"]


def get(mode: str, prediction_id: str = "p1") -> dict:
    hook = CometAPIHook()
    if mode == "sync":
        return hook.get_prediction(prediction_id)

    async def run() -> dict:
        async with hook:
            return await hook.aget_prediction(prediction_id)

    return asyncio.run(run())


def create(mode: str, **kwargs: object) -> dict:
    hook = CometAPIHook()
    args = ("black-forest-labs/flux-schnell", {"prompt": "a paper boat", "aspect_ratio": "1:1"})
    if mode == "sync":
        return hook.create_prediction(*args, **kwargs)

    async def run() -> dict:
        async with hook:
            return await hook.acreate_prediction(*args, **kwargs)

    return asyncio.run(run())


@pytest.mark.parametrize("mode", MODES)
def test_create_sends_input_to_model_path_with_bearer_key(scripted, mode):
    scripted.script(Answer(201, prediction("abc")))
    result = create(mode)
    assert result["id"] == "abc"
    [seen] = scripted.seen
    assert seen.method == "POST"
    assert seen.path == "/replicate/v1/models/black-forest-labs/flux-schnell/predictions"
    assert json.loads(seen.body) == {"input": {"prompt": "a paper boat", "aspect_ratio": "1:1"}}
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
    assert seen.headers["User-Agent"].startswith("airflow-comet/")


@pytest.mark.parametrize("mode", MODES)
def test_status_url_is_built_from_the_connection_never_from_urls(scripted, mode):
    # The answer's urls.get points elsewhere: the second query must still go to the connection's host.
    scripted.script(Answer(200, prediction("abc", "processing")))
    get(mode, "abc")
    get(mode, "abc")
    assert [s.path for s in scripted.seen] == ["/replicate/v1/predictions/abc"] * 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("status", [500, 502, 503, 504, 524])
def test_transient_5xx_is_retried(scripted, mode, status):
    scripted.script(Answer(status, envelope("upstream busy")), Answer(200, prediction(status="processing")))
    assert get(mode)["status"] == "processing"
    assert len(scripted.seen) == 2


@pytest.mark.parametrize("mode", MODES)
def test_gateway_html_524_is_retried_not_a_config_error(scripted, mode):
    scripted.script(Answer(524, "<html>A timeout occurred</html>"), Answer(200, prediction()))
    assert get(mode)["id"] == "p1"
    assert len(scripted.seen) == 2


@pytest.mark.parametrize("mode", MODES)
def test_429_honours_retry_after_seconds(scripted, mode):
    scripted.script(
        Answer(429, envelope("rate limited", "rate_limit_exceeded"), headers={"Retry-After": "1"}),
        Answer(200, prediction()),
    )
    get(mode)
    first, second = scripted.seen
    assert second.at - first.at >= 0.95


@pytest.mark.parametrize("mode", MODES)
def test_429_honours_retry_after_http_date(scripted, mode):
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    scripted.script(Answer(429, envelope("slow down"), headers={"Retry-After": when}), Answer(200, prediction()))
    get(mode)
    first, second = scripted.seen
    # An HTTP date has one-second resolution: at least ~1 s, and not the 0.05 s exponential backoff.
    assert second.at - first.at >= 0.9


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (400, envelope("input.prompt is required", "invalid_request"), CometAPIResponseError),
        (401, envelope("invalid api key", "invalid_api_key"), CometAPIAuthError),
        (403, envelope("model not allowed"), CometAPIAuthError),
        (500, envelope("malformed request", "invalid_request"), CometAPIResponseError),
    ],
)
def test_non_retryable_errors_fail_at_once(scripted, mode, status, body, error):
    scripted.script(Answer(status, body), Answer(200, prediction()))
    with pytest.raises(error) as info:
        create(mode)
    assert len(scripted.seen) == 1
    assert body["error"]["message"] in str(info.value)
    assert str(status) in str(info.value)


def test_auth_error_names_the_connection(scripted):
    scripted.script(Answer(401, envelope("Invalid token")))
    with pytest.raises(CometAPIAuthError, match="cometapi_default"):
        get("sync")


@pytest.mark.parametrize("mode", MODES)
def test_html_page_is_a_clear_error_naming_status_type_and_cause(scripted, mode):
    scripted.script(Answer(200, "<!doctype html><html><body>Welcome</body></html>"))
    with pytest.raises(CometAPINotJSONError) as info:
        get(mode)
    text = str(info.value)
    assert "200" in text and "text/html" in text and "host" in text
    assert len(scripted.seen) == 1


@pytest.mark.parametrize("mode", MODES)
def test_redirect_is_not_followed_and_is_a_clear_error(scripted, mode):
    scripted.script(Answer(301, "<html>Moved</html>", headers={"Location": "https://elsewhere.example/x"}))
    with pytest.raises(CometAPINotJSONError, match="301") as info:
        get(mode)
    assert "elsewhere.example" in str(info.value)
    assert len(scripted.seen) == 1


@pytest.mark.parametrize("mode", MODES)
def test_truncated_json_is_a_clear_error(scripted, mode):
    scripted.script(Answer(200, '{"id": "p1", "status": "proc', content_type="application/json"))
    with pytest.raises(CometAPINotJSONError, match="application/json") as info:
        get(mode)
    # Cut-short JSON is the API's fault, not a wrong host: the message must not send the user to the host.
    assert "does not parse" in str(info.value)
    assert "host is wrong" not in str(info.value)


@pytest.mark.parametrize("mode", MODES)
def test_an_answer_about_another_prediction_is_an_error(scripted, mode):
    scripted.script(Answer(200, prediction("p2", status="succeeded", output=["https://x.example/p2.webp"])))
    with pytest.raises(CometAPIResponseError, match="p1 with prediction 'p2'") as info:
        get(mode, "p1")
    assert not info.value.retryable  # the waiting loops count it as an answer that made no sense


@pytest.mark.parametrize("mode", MODES)
def test_error_envelope_with_200_is_an_error(scripted, mode):
    scripted.script(Answer(200, envelope("quota exhausted", "insufficient_quota")))
    with pytest.raises(CometAPIResponseError, match="quota exhausted"):
        get(mode)


@pytest.mark.parametrize("mode", MODES)
def test_read_timeout_on_status_is_retried(scripted, monkeypatch, mode):
    set_connection(monkeypatch, scripted.url, read_timeout=0.5)
    scripted.script(Answer(200, prediction(), delay=1.5), Answer(200, prediction(status="processing")))
    assert get(mode)["status"] == "processing"
    assert len(scripted.seen) == 2


@pytest.mark.parametrize("mode", MODES)
def test_create_that_may_have_reached_the_server_is_not_resent(scripted, monkeypatch, mode):
    set_connection(monkeypatch, scripted.url, read_timeout=0.5)
    scripted.script(Answer(201, prediction(), delay=1.5))
    with pytest.raises(CometAPIAmbiguousCreateError, match="not sent again"):
        create(mode)
    time.sleep(1.2)  # let the slow answer finish so the count is final
    assert len(scripted.seen) == 1


@pytest.mark.parametrize("mode", MODES)
def test_create_is_retried_when_the_connection_was_refused(monkeypatch, mode):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    set_connection(monkeypatch, f"http://127.0.0.1:{port}", max_retries=2)
    started = time.monotonic()
    with pytest.raises(CometAPITransportError) as info:
        create(mode)
    assert not isinstance(info.value, CometAPIAmbiguousCreateError)
    assert info.value.maybe_sent is False
    assert time.monotonic() - started >= 0.05  # it backed off between attempts


@pytest.mark.parametrize("mode", MODES)
def test_create_is_retried_when_the_host_name_cannot_be_resolved_for_now(monkeypatch, mode):
    # A DNS outage cannot be staged on loopback: the resolver itself answers as glibc does during one
    # ("Temporary failure in name resolution", EAI_AGAIN), for the one host name the connection uses.
    real = socket.getaddrinfo
    asked: list[str] = []

    def resolver(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "api.dns-down.example":
            asked.append(host)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    set_connection(monkeypatch, "http://api.dns-down.example:8765", max_retries=2)
    with pytest.raises(CometAPITransportError) as info:
        create(mode)
    # Nothing was sent: the create was tried again (not reported as one that may have started a prediction),
    # and the message says what failed and for which host.
    assert not isinstance(info.value, CometAPIAmbiguousCreateError)
    assert info.value.maybe_sent is False
    assert len(asked) == 3
    assert "Temporary failure in name resolution" in str(info.value)
    assert "api.dns-down.example" in str(info.value)


@pytest.mark.parametrize("mode", MODES)
def test_retries_stop_after_max_retries(scripted, monkeypatch, mode):
    set_connection(monkeypatch, scripted.url, max_retries=2)
    scripted.script(Answer(503, envelope("down")))
    with pytest.raises(CometAPIResponseError, match="503"):
        get(mode)
    assert len(scripted.seen) == 3


@pytest.mark.parametrize("mode", MODES)
def test_with_retries_off_a_status_error_is_raised_once_and_a_create_still_ambiguous(scripted, monkeypatch, mode):
    # No retries: an idempotent request is one attempt whose error comes back as it is (the async hook sends
    # it without the retry loop); a create that may have reached the server is still reported as ambiguous.
    set_connection(monkeypatch, scripted.url, max_retries=0, read_timeout=0.5)
    scripted.script(Answer(503, envelope("down")))
    with pytest.raises(CometAPIResponseError, match="503") as info:
        get(mode)
    assert info.value.status_code == 503
    assert len(scripted.seen) == 1
    scripted.script(Answer(201, prediction(), delay=1.5))
    with pytest.raises(CometAPIAmbiguousCreateError, match="not sent again"):
        create(mode)
    time.sleep(1.2)  # let the slow answer finish so the count is final
    assert len(scripted.seen) == 1


def test_async_hook_keeps_one_connection_for_many_requests(scripted):
    scripted.script(Answer(200, prediction(status="processing")))
    hook = CometAPIHook()

    async def run() -> None:
        async with hook:
            for _ in range(5):
                await hook.aget_prediction("p1")

    asyncio.run(run())
    assert len(scripted.seen) == 5
    assert scripted.connections == 1
    # A trigger's hook never builds the requests machinery it does not use.
    assert "session" not in vars(hook)


def test_a_hook_left_open_works_in_the_next_event_loop(scripted):
    # Two asyncio.run calls with one hook never closed: its pool belongs to the first loop, which no longer
    # runs that pool's connections and timers (a request on them waited for ever).
    scripted.script(Answer(200, prediction(status="processing")))
    hook = CometAPIHook()

    async def status(close: bool = False) -> str:
        try:
            return (await asyncio.wait_for(hook.aget_prediction("p1"), 10))["status"]
        finally:
            if close:
                await hook.aclose()

    assert asyncio.run(status()) == "processing"
    assert asyncio.run(status(close=True)) == "processing"
    assert len(scripted.seen) == 2
    assert scripted.connections == 2  # the second loop's own connection
    asyncio.run(hook.aclose())  # closed already: nothing left to let go of


def test_sync_hook_keeps_one_connection_for_many_requests(scripted):
    scripted.script(Answer(200, prediction(status="processing")))
    hook = CometAPIHook()
    for _ in range(5):
        hook.get_prediction("p1")
    assert scripted.connections == 1
    # With TCP keep-alive probes (HttpHook's settings): a long Prefer: wait hold is not dropped as idle.
    adapter = hook.session.get_adapter(scripted.url)
    assert isinstance(adapter, TCPKeepAliveAdapter)
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in adapter.socket_options


def test_key_echoed_by_the_server_is_scrubbed_from_errors(scripted):
    scripted.script(Answer(400, envelope(f"bad key {API_KEY} for model")))
    with pytest.raises(CometAPIResponseError) as info:
        get("sync")
    assert API_KEY not in str(info.value)
    assert "***" in str(info.value)


def test_key_stays_out_of_logs_while_retrying(scripted, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    scripted.script(
        Answer(503, envelope(f"upstream said {API_KEY}")),
        Answer(429, envelope("slow"), headers={"Retry-After": "0"}),
        Answer(200, prediction()),
    )
    get("sync")
    # Airflow 3 logs through structlog to stdout, Airflow 2 through logging: read both.
    logged = caplog.text + capsys.readouterr().out
    assert "retry 2 of 4" in logged
    assert API_KEY not in logged


@pytest.mark.parametrize("mode", [*MODES, "trigger"])
def test_no_connection_extra_is_sent_as_a_header(scripted, monkeypatch, mode):
    # The extras are settings, never headers, whatever their names: a note for the team (or anything an
    # admin types into the form) must not reach CometAPI.
    extras = {"team_note": "billing is Ana's", "X-Debug": "1", "timeout": 3, "max_requests_per_second": 5}
    set_connection(monkeypatch, scripted.url, **extras)
    scripted.script(Answer(200, prediction(status="succeeded", output=["https://x.example/a.png"])))
    if mode == "trigger":
        from airflow_comet.triggers.prediction import PredictionTrigger
        from tests.test_trigger import events

        [event] = asyncio.run(events(PredictionTrigger("p1"), limit=20))
        assert event["status"] == "succeeded"
    else:
        get(mode)
    sent = {k.lower() for k in scripted.seen[0].headers}
    own = {"connect_timeout", "read_timeout", "max_retries", "retry_backoff", "max_requests_per_second"}
    assert not sent & {*own, *(k.lower() for k in extras)}
    assert sent >= {"authorization", "user-agent", "accept"}


@pytest.mark.parametrize("name", ["run", "run_with_advanced_retry", "run_and_check", "url_from_endpoint"])
def test_there_is_no_request_path_around_auth_retries_and_the_redirect_guard(name):
    # HttpHook's request methods would send without the Bearer key, the retry policy and allow_redirects=False.
    assert not hasattr(CometAPIHook(), name)


def test_test_connection_accepts_a_json_404_and_rejects_401_and_html(scripted):
    scripted.script(Answer(404, envelope("prediction not found", "not_found")))
    ok, message = CometAPIHook().test_connection()
    assert ok, message
    scripted.script(Answer(401, envelope("Invalid token")))
    ok, message = CometAPIHook().test_connection()
    assert not ok and "401" in message
    scripted.script(Answer(200, "<html>hi</html>"))
    ok, message = CometAPIHook().test_connection()
    assert not ok and "host" in message


def test_test_connection_asks_once_and_answers_at_once_when_the_api_is_down(scripted):
    # The connection form's button: a 503 is reported, not retried for a minute with backoff.
    scripted.script(Answer(503, envelope("upstream down")))
    ok, message = CometAPIHook().test_connection()
    assert not ok and "503" in message
    assert len(scripted.seen) == 1


def test_cancel_missing_endpoint_is_logged_not_raised(scripted):
    scripted.script(Answer(404, envelope("no such route")))
    assert CometAPIHook().cancel_prediction("p1") is None


def test_not_found_prediction(scripted):
    scripted.script(Answer(404, envelope("prediction not found", "not_found")))
    with pytest.raises(CometAPINotFoundError):
        get("sync", "nope")


def test_empty_key_names_the_connection(monkeypatch):
    set_connection(monkeypatch, "http://127.0.0.1:9", key="")
    with pytest.raises(CometAPIConfigError, match="cometapi_default.*password"):
        get("sync")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pasted", ["sk-abc\u200bdef", "sk-abc def", "sk-abc\ndef", "sk-clé"])
def test_a_key_no_header_can_carry_is_a_config_error_that_does_not_show_it(scripted, monkeypatch, mode, pasted):
    set_connection(monkeypatch, scripted.url, key=pasted)
    with pytest.raises(CometAPIConfigError, match="cometapi_default.*paste the key again") as info:
        get(mode)
    assert "sk-" not in str(info.value)
    assert scripted.seen == []


def test_missing_connection_names_it(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_COMETAPI_DEFAULT", raising=False)
    with pytest.raises(Exception, match="cometapi_default"):
        CometAPIHook().get_prediction("p1")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (None, "https://api.cometapi.com"),
        ("api.cometapi.com", "https://api.cometapi.com"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
        ("https://api.cometapi.com/replicate/v1", "https://api.cometapi.com"),
    ],
)
def test_host_normalisation(host, expected):
    from airflow_comet.hooks._settings import base_url_from

    assert base_url_from("c", host, None) == expected


def test_prediction_id_that_would_change_the_path_is_refused(scripted):
    scripted.script(Answer(200, prediction()))
    with pytest.raises(ValueError, match="prediction_id"):
        CometAPIHook().get_prediction("../models/x")
    assert scripted.seen == []
