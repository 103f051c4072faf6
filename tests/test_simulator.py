"""The built-in CometAPI simulator, exercised over real HTTP on loopback (plain ``requests``)."""

from __future__ import annotations

import email.utils
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import requests
from PIL import Image

from airflow_comet.testing import CometAPISimulator, Faults

pytest_plugins = ["airflow_comet.testing.pytest_plugin", "pytester"]


@pytest.fixture
def cometapi_simulator_options() -> dict[str, Any]:
    # Short runs keep the file fast; tests that need other settings parametrize this fixture.
    return {"faults": Faults(durations=0.3)}


def with_faults(**fields: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("cometapi_simulator_options", [{"faults": Faults(**fields)}], ids=["faults"])


SCHNELL = "black-forest-labs/flux-schnell"
DEV = "black-forest-labs/flux-dev"
KONTEXT = "black-forest-labs/flux-kontext-pro"
REPO_ROOT = Path(__file__).resolve().parents[1]


def auth(sim: CometAPISimulator, key: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key or sim.api_key}"}


def create(
    sim: CometAPISimulator,
    inputs: dict[str, Any] | None = None,
    model: str = SCHNELL,
    wait: int | None = None,
    **kw: Any,
) -> requests.Response:
    headers = auth(sim)
    if wait is not None:
        headers["Prefer"] = f"wait={wait}"
    headers.update(kw.pop("headers", {}))
    body = {"input": inputs if inputs is not None else {"prompt": "a lighthouse at dusk"}}
    kw.setdefault("timeout", 10)
    return requests.post(f"{sim.base_url}/replicate/v1/models/{model}/predictions", json=body, headers=headers, **kw)


def get(sim: CometAPISimulator, pid: str, **kw: Any) -> requests.Response:
    return requests.get(f"{sim.base_url}/replicate/v1/predictions/{pid}", headers=auth(sim), timeout=10, **kw)


def cancel(sim: CometAPISimulator, pid: str) -> requests.Response:
    return requests.post(f"{sim.base_url}/replicate/v1/predictions/{pid}/cancel", headers=auth(sim), timeout=10)


def assert_envelope(resp: requests.Response, status: int, code: str, param: str = "") -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["code"] == code
    assert error["type"] == "comet_api_error"
    assert error["param"] == param
    assert "(request id: " in error["message"]
    return error


# -- the happy path ------------------------------------------------------------------------------


def test_prediction_runs_starting_processing_succeeded(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    resp = create(sim, {"prompt": "a red fox", "num_outputs": 2})
    assert resp.status_code == 201
    body = resp.json()
    pid = body["id"]
    assert len(pid) == 26 and pid.isalnum() and pid == pid.lower()
    assert body["status"] == "starting"
    assert body["model"] == SCHNELL and body["version"] == "hidden" and body["source"] == "api"
    assert body["output"] is None and body["error"] is None and body["logs"] == ""
    assert time.strptime(body["created_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert len(body["created_at"].split(".")[1]) == 4  # milliseconds + "Z"
    # Like the real service, the links point at another host than the API.
    assert body["urls"] == {
        "get": f"{sim.delivery_url}/v1/predictions/{pid}",
        "cancel": f"{sim.delivery_url}/v1/predictions/{pid}/cancel",
        "stream": f"{sim.delivery_url}/v1/files/stream/{pid}",
        "web": f"{sim.delivery_url}/p/{pid}",
    }
    assert sim.delivery_url != sim.base_url

    seen: list[str] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        current = get(sim, pid).json()
        if not seen or seen[-1] != current["status"]:
            seen.append(current["status"])
        if current["status"] == "succeeded":
            break
        time.sleep(0.03)
    assert seen == ["starting", "processing", "succeeded"]
    assert current["output"] == [f"{sim.delivery_url}/v1/files/{pid}/{i}.webp" for i in range(2)]
    assert current["metrics"]["image_count"] == 2 and current["metrics"]["predict_time"] > 0
    assert current["started_at"] and current["completed_at"] and current["completed_at"] > current["started_at"]
    assert current["logs"].startswith("Using seed: ") and "Generating..." in current["logs"]

    record = sim.prediction(pid)
    created = datetime.strptime(record["created_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert record["sim_terminal_epoch"] == pytest.approx(created.timestamp() + record["sim_duration"], abs=0.01)
    assert len(sim.creates()) == 1 and len(sim.polls(pid)) == len(sim.polls()) >= 3


@with_faults(durations=0.05)
@pytest.mark.parametrize(
    ("fmt", "ratio", "size", "pil_format", "content_type"),
    [
        ("png", "16:9", (640, 360), "PNG", "image/png"),
        ("jpg", "1:1", (512, 512), "JPEG", "image/jpeg"),
        ("webp", "9:16", (360, 640), "WEBP", "image/webp"),
    ],
)
def test_output_files_are_real_images_that_depend_on_the_prompt(
    cometapi_simulator: CometAPISimulator,
    fmt: str,
    ratio: str,
    size: tuple[int, int],
    pil_format: str,
    content_type: str,
) -> None:
    sim = cometapi_simulator
    pixels = {}
    for prompt in ("a red fox", "a blue whale", "a red fox"):
        body = create(sim, {"prompt": prompt, "output_format": fmt, "aspect_ratio": ratio}, wait=5).json()
        assert body["status"] == "succeeded"
        (url,) = body["output"]
        assert url.startswith(sim.delivery_url + "/") and url.endswith("." + fmt)
        file = requests.get(url, timeout=10)
        assert file.status_code == 200
        assert file.headers["Content-Type"] == content_type
        assert int(file.headers["Content-Length"]) == len(file.content)
        image = Image.open(io.BytesIO(file.content))
        assert image.format == pil_format and image.size == size
        pixels.setdefault(prompt, []).append(image.convert("RGB").tobytes())
    assert pixels["a red fox"][0] != pixels["a blue whale"][0]
    assert pixels["a red fox"][0] == pixels["a red fox"][1]  # same prompt, same picture
    # The delivery host never needs, and here never got, the API key.
    assert sim.downloads() and all("Authorization" not in r.headers for r in sim.delivery_requests())
    assert all(r.headers.get("Authorization") == "Bearer sim-key" for r in sim.creates())


def test_image_editing_model_takes_a_data_uri_and_rejects_junk(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    ok = create(sim, {"prompt": "make it blue", "input_image": "data:image/png;base64,iVBORw0KGgo="}, model=KONTEXT)
    assert ok.status_code == 201
    bad = create(sim, {"prompt": "x", "input_image": "data:image/png;base64,@@@"}, model=KONTEXT)
    assert_envelope(bad, 400, "invalid_request", "input.input_image")
    assert_envelope(create(sim, {"prompt": "x", "num_outputs": 9}), 400, "invalid_request", "input.num_outputs")


# -- errors in the API's own shape ----------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sim-key"}])
def test_missing_or_wrong_key_is_401(cometapi_simulator: CometAPISimulator, headers: dict[str, str]) -> None:
    sim = cometapi_simulator
    resp = requests.post(
        f"{sim.base_url}/replicate/v1/models/{SCHNELL}/predictions", json={"input": {}}, headers=headers, timeout=10
    )
    assert_envelope(resp, 401, "invalid_api_key")
    assert sim.predictions() == []


@pytest.mark.parametrize("data", [b"not json", b'{"prompt": "no input key"}', b'{"input": "a string"}', b"[]"])
def test_bad_body_is_400(cometapi_simulator: CometAPISimulator, data: bytes) -> None:
    sim = cometapi_simulator
    resp = requests.post(f"{sim.base_url}/replicate/v1/models/{SCHNELL}/predictions", data=data, headers=auth(sim))
    assert_envelope(resp, 400, "invalid_request", "input")
    assert sim.predictions() == []


def test_unknown_model_and_unknown_prediction_are_404(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    error = assert_envelope(create(sim, model="acme/no-such-model"), 404, "model_not_found")
    assert "acme/no-such-model" in error["message"]
    assert_envelope(get(sim, "q4chw5rey9rmt0cww76t4h3ma4"), 404, "not_found")
    assert_envelope(cancel(sim, "q4chw5rey9rmt0cww76t4h3ma4"), 404, "not_found")


def test_wrong_method_is_405_envelope(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    resp = requests.delete(f"{sim.base_url}/replicate/v1/predictions/abc", headers=auth(sim), timeout=10)
    assert_envelope(resp, 405, "method_not_allowed")


def test_paths_outside_the_api_answer_like_a_web_site(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    missing = requests.get(f"{sim.base_url}/replicate/v2/whatever", headers=auth(sim), timeout=10)
    assert missing.status_code == 404 and missing.headers["Content-Type"].startswith("text/html")
    assert "<html>" in missing.text
    for path in ("/", "/v1/models/black-forest-labs/flux-schnell/predictions"):
        moved = requests.post(sim.base_url + path, json={"input": {}}, headers=auth(sim), allow_redirects=False)
        assert moved.status_code == 301 and moved.headers["Content-Type"].startswith("text/html")
        assert moved.headers["Location"] == "/console" and "301 Moved Permanently" in moved.text
    # A client that follows the redirect ends on a 200 HTML page: it must not take that for JSON.
    followed = requests.get(sim.base_url + "/v1/predictions/abc", headers=auth(sim), timeout=10)
    assert followed.status_code == 200 and followed.headers["Content-Type"].startswith("text/html")
    assert sim.predictions() == []


# -- cancel and Prefer: wait -----------------------------------------------------------------------


@with_faults(never_finish=True)
def test_cancel_makes_it_canceled_for_good(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    pid = create(sim).json()["id"]
    resp = cancel(sim, pid)
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    assert resp.json()["completed_at"] is not None
    time.sleep(0.15)
    assert get(sim, pid).json()["status"] == "canceled"
    assert sim.prediction(pid)["sim_terminal_epoch"] is not None
    assert [r.prediction_id for r in sim.cancels()] == [pid]


def test_cancel_of_a_finished_prediction_changes_nothing(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    pid = create(sim, wait=5).json()["id"]
    assert cancel(sim, pid).json()["status"] == "succeeded"
    assert get(sim, pid).json()["status"] == "succeeded"


def test_prefer_wait_answers_with_the_finished_prediction(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    started = time.monotonic()
    resp = create(sim, wait=10)
    elapsed = time.monotonic() - started
    assert resp.status_code == 201
    body = resp.json()
    assert body["status"] == "succeeded" and body["output"] and body["completed_at"]
    assert 0.25 <= elapsed < 2


@with_faults(never_finish=True)
def test_prefer_wait_gives_up_after_n_seconds_and_wakes_on_cancel(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    started = time.monotonic()
    assert create(sim, wait=1).json()["status"] in ("starting", "processing")
    assert 0.9 <= time.monotonic() - started < 2

    def cancel_the_waiting_one() -> None:
        deadline = time.monotonic() + 5
        while len(sim.predictions()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = [p["id"] for p in sim.predictions() if p["status"] != "canceled"][-1]
        cancel(sim, waiting)

    helper = threading.Thread(target=cancel_the_waiting_one)
    helper.start()
    started = time.monotonic()
    assert create(sim, wait=30).json()["status"] == "canceled"
    assert time.monotonic() - started < 3
    helper.join()


# -- faults ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("http_date", [False, True])
def test_429_burst_then_recovery(cometapi_simulator: CometAPISimulator, http_date: bool) -> None:
    sim = cometapi_simulator
    sim.set_faults(durations=0.3, rate_limit_429=2, retry_after=3, retry_after_http_date=http_date)
    for _ in range(2):
        resp = create(sim)
        assert_envelope(resp, 429, "rate_limit_exceeded")
        retry_after = resp.headers["Retry-After"]
        if http_date:
            delay = email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
            assert 1 <= delay <= 4
        else:
            assert retry_after == "3"
    assert sim.predictions() == []
    assert create(sim).status_code == 201
    assert [r.status for r in sim.creates()] == [429, 429, 201]


def test_429_for_a_time_window(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    sim.set_faults(rate_limit_429_seconds=0.3)
    assert [create(sim).status_code for _ in range(3)] == [429, 429, 429]
    time.sleep(0.35)
    assert create(sim).status_code == 201


@with_faults(durations=0.1, fail_rate=1.0)
def test_fail_rate_one_fails_every_prediction(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    body = create(sim, wait=5).json()
    assert body["status"] == "failed"
    assert "NSFW" in body["error"] and body["output"] is None and body["completed_at"]
    assert "Error: NSFW" in body["logs"]


def test_fail_rate_is_reproducible_with_a_seed() -> None:
    def outcomes() -> list[str]:
        with CometAPISimulator(faults=Faults(durations=0.0, fail_rate=0.5), seed=0) as sim:
            ids = [create(sim).json()["id"] for _ in range(8)]
            return [get(sim, pid).json()["status"] for pid in ids]

    first = outcomes()
    assert first == outcomes()
    assert set(first) == {"failed", "succeeded"}


def test_durations_per_model_callable_and_never(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    sim.set_faults(durations={SCHNELL: 0.0, DEV: lambda model, inputs: 0.05 if inputs["prompt"] == "fast" else None})
    instant = create(sim).json()["id"]
    fast = create(sim, {"prompt": "fast"}, model=DEV, wait=5).json()
    never = create(sim, {"prompt": "slow"}, model=DEV).json()["id"]
    assert get(sim, instant).json()["status"] == "succeeded"
    assert fast["status"] == "succeeded"
    assert sim.prediction(fast["id"])["sim_duration"] == pytest.approx(0.05)
    assert sim.prediction(never)["sim_terminal_epoch"] is None
    assert get(sim, never).json()["completed_at"] is None
    # The default for models not in the mapping is the model's own range (flux-1.1-pro: 4-10 s).
    other = create(sim, model="black-forest-labs/flux-1.1-pro").json()["id"]
    assert 4 <= sim.prediction(other)["sim_duration"] <= 10


def test_a_taken_port_fails_start_loudly(cometapi_simulator: CometAPISimulator) -> None:
    with pytest.raises(OSError):
        CometAPISimulator(port=cometapi_simulator.port).start()


def test_per_model_faults_only_touch_that_model(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    sim.set_faults(Faults(durations=0.1, per_model={DEV: Faults(durations=0.1, fail_rate=1.0)}))
    assert create(sim, model=DEV, wait=5).json()["status"] == "failed"
    assert create(sim, model=SCHNELL, wait=5).json()["status"] == "succeeded"


def test_poll_5xx_json_from_the_api_and_html_from_gateways(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    pid = create(sim).json()["id"]
    sim.set_faults(durations=0.3, poll_5xx_rate=1.0, poll_5xx_codes=(503,))
    assert_envelope(get(sim, pid), 503, "service_unavailable")
    sim.set_faults(durations=0.3, poll_5xx_rate=1.0, poll_5xx_codes=(524,))
    gateway = get(sim, pid)
    assert gateway.status_code == 524 and gateway.headers["Content-Type"].startswith("text/html")
    sim.set_faults(durations=0.3)
    assert get(sim, pid).status_code == 200


def test_create_5xx_creates_nothing_then_recovers(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    sim.set_faults(create_5xx_count=2)
    assert [create(sim).status_code for _ in range(3)] == [503, 503, 201]
    assert len(sim.predictions()) == 1
    sim.set_faults(invalid_request_500=True)
    assert_envelope(create(sim), 500, "invalid_request")
    assert len(sim.predictions()) == 1


def test_slow_create_times_out_after_the_prediction_exists(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    sim.set_faults(slow_create_seconds=1.0)
    with pytest.raises(requests.exceptions.ReadTimeout):
        create(sim, timeout=0.3)
    assert len(sim.predictions()) == 1  # the ambiguous case: the client never saw the id


def test_slow_status_trips_a_read_timeout(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    pid = create(sim).json()["id"]
    sim.set_faults(slow_status_seconds=1.0)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(f"{sim.base_url}/replicate/v1/predictions/{pid}", headers=auth(sim), timeout=0.3)


@pytest.mark.parametrize(
    ("faults", "check"),
    [
        (Faults(html_rate=1.0, html_statuses=(502,)), lambda r: r.status_code == 502 and "<html" in r.text),
        (Faults(html_rate=1.0, html_statuses=(200,)), lambda r: r.status_code == 200 and "<html" in r.text),
        (Faults(truncated_json_rate=1.0), lambda r: r.status_code == 200 and _not_json(r.text)),
        (Faults(missing_fields=True), lambda r: "status" not in r.json() and r.json()["id"]),
        (Faults(unknown_status="weird"), lambda r: r.json()["status"] == "weird"),
        (Faults(error_envelope_200=True), lambda r: r.status_code == 200 and set(r.json()) == {"error"}),
    ],
)
def test_spoiled_status_bodies(cometapi_simulator: CometAPISimulator, faults: Faults, check: Any) -> None:
    sim = cometapi_simulator
    pid = create(sim).json()["id"]  # body faults hit status polls by default, not creates
    sim.set_faults(faults)
    assert check(get(sim, pid))
    assert create(sim).json()["status"] == "starting"


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def test_download_faults(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    url = create(sim, {"prompt": "files", "output_format": "png"}, wait=5).json()["output"][0]
    good = requests.get(url, timeout=10).content

    sim.set_faults(durations=0.3, file_404=True)
    assert requests.get(url, timeout=10).status_code == 404
    sim.set_faults(durations=0.3, file_content_type="text/html")
    wrong = requests.get(url, timeout=10)
    assert wrong.headers["Content-Type"] == "text/html" and wrong.content == good
    sim.set_faults(durations=0.3, file_truncated=True)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url, timeout=10)
    sim.set_faults(durations=0.3, file_size_bytes=3_000_000)
    big = requests.get(url, timeout=10, stream=True)
    assert big.headers["Content-Length"] == "3000000"
    assert sum(len(chunk) for chunk in big.iter_content(1 << 16)) == 3_000_000


def test_following_prediction_links_is_recorded(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    body = create(sim).json()
    assert not [r for r in sim.delivery_requests() if r.endpoint == "followed_url"]
    resp = requests.get(body["urls"]["get"], headers=auth(sim), timeout=10)
    assert resp.status_code == 401  # harmless: those links belong to another service
    (followed,) = [r for r in sim.delivery_requests() if r.endpoint == "followed_url"]
    assert followed.path == f"/v1/predictions/{body['id']}" and followed.headers["Authorization"] == "Bearer sim-key"


# -- admin endpoints, log and counters ---------------------------------------------------------------


def test_admin_endpoints_steer_and_read_the_simulator(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    admin = f"{sim.base_url}/_simulator"
    resp = requests.post(f"{admin}/faults", json={"durations": 0.1, "fail_rate": 1}, timeout=10)
    assert resp.status_code == 200 and resp.json()["faults"]["fail_rate"] == 1.0
    assert sim.faults.fail_rate == 1.0
    assert create(sim, wait=5).json()["status"] == "failed"

    log = requests.get(f"{admin}/requests", timeout=10).json()["requests"]
    assert [(r["server"], r["method"], r["endpoint"], r["status"]) for r in log] == [("api", "POST", "create", 201)]
    assert log[0]["model"] == SCHNELL and log[0]["headers"]["Authorization"] == "Bearer sim-key"
    (pred,) = requests.get(f"{admin}/predictions", timeout=10).json()["predictions"]
    assert pred["status"] == "failed" and pred["sim_terminal_epoch"] <= time.time()

    bad = requests.post(f"{admin}/faults", json={"no_such_fault": 1}, timeout=10)
    assert_envelope(bad, 400, "invalid_request", "faults")
    assert "no_such_fault" in bad.json()["error"]["message"]

    assert requests.post(f"{admin}/reset", timeout=10).status_code == 200
    assert sim.requests == [] and sim.predictions() == []
    assert sim.faults.fail_rate == 0.0  # back to the constructor's faults
    assert requests.get(f"{admin}/requests", timeout=10).json()["requests"] == []


def test_request_counters(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    with requests.Session() as session:  # keep-alive: one connection for all of them
        for _ in range(5):
            session.get(f"{sim.base_url}/replicate/v1/predictions/nope", headers=auth(sim), timeout=10)
    requests.get(f"{sim.base_url}/_simulator/stats", timeout=10)
    assert sim.connections_opened("api") == 2  # the session's, then the admin call's
    assert 1 <= sim.max_requests_per_second() <= 5  # admin requests are not counted
    assert len(sim.requests) == 5 and all(r.status == 404 for r in sim.requests)


def test_reset_from_python_clears_state(cometapi_simulator: CometAPISimulator) -> None:
    sim = cometapi_simulator
    pid = create(sim).json()["id"]
    sim.reset()
    assert sim.requests == [] and sim.predictions() == []
    with pytest.raises(KeyError):
        sim.prediction(pid)
    assert get(sim, pid).status_code == 404


# -- ways to run it -------------------------------------------------------------------------------------


def test_only_loopback_hosts_are_accepted() -> None:
    with pytest.raises(ValueError, match="127.0.0.1"):
        CometAPISimulator(host="0.0.0.0")


def test_pytest_plugin_marker_and_connection_fixture(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["airflow_comet.testing.pytest_plugin"]')
    pytester.makepyfile(
        """
        import json, os
        import pytest
        from airflow_comet.testing import Faults

        @pytest.mark.cometapi_simulator(api_key="marked", faults=Faults(fail_rate=1.0))
        def test_marker(cometapi_simulator):
            assert cometapi_simulator.api_key == "marked"
            assert cometapi_simulator.faults.fail_rate == 1.0

        def test_connection(cometapi_connection):
            conn = json.loads(os.environ["AIRFLOW_CONN_COMETAPI_DEFAULT"])
            assert conn["host"] == cometapi_connection.base_url
        """
    )
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-p", "no:asyncio", "-W", "error::pytest.PytestUnknownMarkWarning"
    )
    result.assert_outcomes(passed=2)
    assert "AIRFLOW_CONN_COMETAPI_DEFAULT" not in os.environ  # monkeypatch undid it


def test_connection_helpers(cometapi_connection: CometAPISimulator) -> None:
    sim = cometapi_connection
    conn = json.loads(os.environ["AIRFLOW_CONN_COMETAPI_DEFAULT"])
    assert conn == {"conn_type": "cometapi", "password": "sim-key", "host": sim.base_url}
    assert json.loads(sim.connection_json()) == conn
    uri = sim.connection_uri()
    assert uri.startswith("cometapi://http://:sim-key@")
    # Airflow reads the host part back percent-decoded: scheme + host + port.
    assert "http://" + unquote(urlsplit(uri.removeprefix("cometapi://")).netloc.split("@")[1]) == sim.base_url


def test_context_manager_stops_the_server() -> None:
    with CometAPISimulator() as sim:
        url = sim.base_url
        assert requests.get(url + "/replicate/v1/predictions/x", headers=auth(sim), timeout=5).status_code == 404
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url + "/replicate/v1/predictions/x", timeout=2)


def test_command_line_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_comet.testing", "--port", "0", "--api-key", "k2"]
        + ["--duration", "0.1", "0.2", "--fail-rate", "1", "--seed", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )
    killer = threading.Timer(15, proc.kill)  # never hang the suite on a stuck child
    killer.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith("CometAPI simulator listening on http://127.0.0.1:"), (line, proc.stderr.read())
        base_url = line.split()[4]
        resp = requests.post(
            f"{base_url}/replicate/v1/models/{SCHNELL}/predictions",
            json={"input": {"prompt": "cli"}},
            headers={"Authorization": "Bearer k2", "Prefer": "wait=5"},
            timeout=10,
        )
        assert resp.status_code == 201 and resp.json()["status"] == "failed" and resp.json()["error"]
        delivery_url = line.split()[-1].rstrip(")")
        assert delivery_url.startswith("http://127.0.0.1:") and resp.json()["urls"]["get"].startswith(delivery_url)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
