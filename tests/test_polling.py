"""The one decision function behind every wait: schedule, terminal events, errors, deadlines."""

from __future__ import annotations

import random

import pytest

from airflow_comet.exceptions import (
    CometAPIAuthError,
    CometAPIConfigError,
    CometAPINotFoundError,
    CometAPINotJSONError,
    CometAPIResponseError,
    CometAPITransportError,
)
from airflow_comet.polling import (
    MAX_BAD_ANSWERS,
    MAX_FATAL_ERRORS,
    OVERDUE_GRACE,
    PredictionPoller,
    compact_prediction,
    next_poll_delay,
)
from tests.scripted_server import prediction


def poller(**kwargs) -> PredictionPoller:
    return PredictionPoller(prediction_id="p1", started_at=0.0, rng=random.Random(1), **kwargs)


def test_first_poll_is_soon_and_gaps_grow_to_the_poll_interval():
    rng = random.Random(0)
    assert poller().first_delay(0.0) == pytest.approx(1.7)  # one young gap after creation
    assert poller().first_delay(1.0) == pytest.approx(0.7)
    assert poller(poll_interval=0.5).first_delay(0.0) == pytest.approx(1.0)  # the gap is never set under 1 s
    assert poller().first_delay(3.0) == 0.0  # picked up late while young: check at once
    young = [next_poll_delay(age, 20, rng) for age in (1, 5, 9)]
    assert all(1.5 <= d <= 1.9 for d in young)  # a young prediction's end is noticed within ~2 s
    older = [next_poll_delay(age, 20, rng) for age in (15, 30, 60)]
    assert older == sorted(older) and older[0] > 2.5
    assert 18 <= next_poll_delay(600, 20, rng) <= 22  # capped at the poll interval


def simulate_requests(duration: float, poll_interval: float = 20.0) -> int:
    """Status requests a poller sends for a prediction that takes ``duration`` seconds."""
    p = PredictionPoller(prediction_id="p1", started_at=0.0, poll_interval=poll_interval)
    now = p.first_delay(0.0)
    polls = 0
    while True:
        polls += 1
        status = "succeeded" if now >= duration else "processing"
        outcome = p.on_prediction(prediction(status=status), now)
        if outcome.event:
            return polls
        now += outcome.delay


def test_requests_per_prediction_stay_small():
    assert simulate_requests(2) <= 2
    # A 60 s prediction costs at most 12 status requests, whatever the jitter.
    assert max(simulate_requests(60) for _ in range(50)) <= 12


def test_terminal_statuses_end_the_wait():
    assert poller().on_prediction(prediction(status="succeeded"), 1).event["status"] == "succeeded"
    failed = poller().on_prediction(prediction(status="failed", error="NSFW content detected"), 1).event
    assert failed["status"] == "failed" and "NSFW content detected" in failed["message"]
    assert "p1" in failed["message"]
    assert poller().on_prediction(prediction(status="canceled"), 1).event["status"] == "canceled"
    # Replicate's "aborted" produced nothing: report it as failed, naming the real status.
    aborted = poller().on_prediction(prediction(status="aborted"), 1).event
    assert aborted["status"] == "failed" and "aborted" in aborted["message"]


def test_running_prediction_keeps_polling():
    outcome = poller().on_prediction(prediction(status="processing"), 1)
    assert outcome.event is None and outcome.delay > 0


def test_transient_errors_never_fail_before_the_deadline():
    p = poller(end_time=1000.0)
    for i in range(100):
        outcome = p.on_error(CometAPIResponseError("503", status_code=503, retryable=True), float(i))
        assert outcome.event is None
        assert outcome.delay >= 0.2  # never a hot loop
    assert p.on_error(CometAPITransportError("reset", maybe_sent=True), 1000.0).event["status"] == "timeout"


def test_auth_lost_or_prediction_gone_fails_after_a_few_in_a_row():
    for error in (CometAPIAuthError("401", status_code=401), CometAPINotFoundError("404", status_code=404)):
        p = poller()
        events = [p.on_error(error, float(i)).event for i in range(MAX_FATAL_ERRORS)]
        assert events[:-1] == [None] * (MAX_FATAL_ERRORS - 1)
        assert events[-1]["status"] == "error" and str(error) in events[-1]["message"]


def test_a_good_answer_resets_the_error_count():
    p = poller()
    for _ in range(MAX_FATAL_ERRORS - 1):
        p.on_error(CometAPIAuthError("401"), 1)
    p.on_prediction(prediction(status="processing"), 2)
    assert p.on_error(CometAPIAuthError("401"), 3).event is None


def test_nonsense_answers_get_a_bounded_number_of_tries():
    p = poller()
    outcomes = [p.on_prediction({"id": "p1", "status": "weird"}, float(i)) for i in range(MAX_BAD_ANSWERS)]
    assert all(o.event is None for o in outcomes[:-1])
    assert outcomes[-1].event["status"] == "error" and "weird" in outcomes[-1].event["message"]
    p = poller()
    for i in range(MAX_BAD_ANSWERS - 1):
        assert p.on_error(CometAPINotJSONError("html"), float(i)).event is None
    assert p.on_error(CometAPINotJSONError("html"), 99.0).event["status"] == "error"


def test_config_error_fails_at_once():
    assert poller().on_error(CometAPIConfigError("no key"), 0).event["status"] == "error"


def test_deadline_gives_a_timeout_event_naming_it_and_the_last_status():
    p = poller(end_time=30.0)
    p.on_prediction(prediction(status="processing"), 10)
    event = p.on_prediction(prediction(status="processing"), 30.5).event
    assert event["status"] == "timeout"
    assert "processing" in event["message"] and "p1" in event["message"]
    assert event["prediction"]["status"] == "processing"


def test_delay_never_passes_the_deadline():
    p = poller(end_time=5.5, poll_interval=60)
    assert p.on_prediction(prediction(status="processing"), 5.0).delay <= 0.5 + 1e-9


def test_compact_prediction_elides_data_uris_but_keeps_outputs():
    big = "data:image/png;base64," + "A" * 5000
    compact = compact_prediction(prediction(status="succeeded", input={"input_image": big, "prompt": "x"}, output=["u"]))
    assert len(compact["input"]["input_image"]) < 100
    assert compact["input"]["prompt"] == "x" and compact["output"] == ["u"]


def test_the_last_answer_is_kept_elided_and_read_back_as_a_new_copy():
    big = "data:image/png;base64," + "A" * 5000
    p = poller()
    assert p.last_prediction is None
    p.on_prediction(prediction(status="starting", input={"input_image": big, "prompt": "x"}), 1.0)
    p.on_prediction(prediction(status="processing", input={"input_image": big, "prompt": "x"}, logs="step 3"), 3.0)
    p.on_error(CometAPITransportError("reset", maybe_sent=False), 5.0)  # an error keeps the last answer
    last = p.last_prediction
    assert last["status"] == "processing" and last["logs"] == "step 3" and last["urls"]["get"]
    assert last["input"]["prompt"] == "x" and len(last["input"]["input_image"]) < 100
    last["status"] = "changed by the reader"
    last["urls"]["get"] = "changed deeper down"
    assert p.last_prediction["status"] == "processing"
    assert p.last_prediction["urls"]["get"] != "changed deeper down"


def test_the_last_answer_is_a_copy_of_the_callers():
    p = poller()
    answer = prediction(status="processing")
    p.on_prediction(answer, 1.0)
    answer["status"] = "changed by the caller"
    p.last_prediction["status"] = "changed by a reader"
    assert p.last_prediction["status"] == "processing"


@pytest.mark.parametrize("bad", [None, "text", 3])
def test_not_a_dict_is_a_bad_answer(bad):
    assert poller().on_prediction(bad, 0).event is None


def test_status_changes_are_reported_once_each_and_bad_answers_are_not_changes():
    p = poller()
    seen = []
    for now, answer in enumerate(
        [prediction(status="starting"), prediction(status="starting"), {"status": "weird"},
         prediction(status="processing"), prediction(status="processing"), prediction(status="succeeded")]
    ):
        outcome = p.on_prediction(answer, float(now))
        seen.append((outcome.previous_status, outcome.new_status) if outcome.new_status else outcome.problem)
    assert seen == [
        (None, "starting"),
        None,
        "the answer has no known status (status='weird')",
        ("starting", "processing"),
        None,
        ("processing", "succeeded"),
    ]
    assert outcome.event is not None and outcome.event["status"] == "succeeded"


def test_a_failed_check_is_a_problem_and_waits_as_the_server_asked_up_to_the_poll_interval():
    p = poller(poll_interval=20)
    busy = p.on_error(CometAPIResponseError("429 busy", status_code=429, retryable=True, retry_after=12), 30.0)
    assert busy.event is None and "429 busy" in busy.problem
    assert busy.delay >= 12
    greedy = poller(poll_interval=20).on_error(
        CometAPIResponseError("503", status_code=503, retryable=True, retry_after=600), 30.0
    )
    assert greedy.delay <= 20 * 1.1  # poll_interval (with its jitter) is the longest gap promised
    auth = poller().on_error(CometAPIAuthError("401 revoked", status_code=401), 1.0)
    assert auth.event is None and "401 revoked" in auth.problem


def test_a_check_a_shade_before_the_deadline_is_the_last_one():
    p = poller(end_time=30.0)
    assert p.on_prediction(prediction(status="processing"), 29.97).event["status"] == "timeout"
    assert poller(end_time=30.0).on_prediction(prediction(status="processing"), 29.5).event is None


def test_a_check_long_overdue_past_the_deadline_is_not_sent():
    p = poller(end_time=30.0)
    assert p.timeout_if_overdue(30.0 + OVERDUE_GRACE - 1) is None  # a check due at the deadline still goes out
    outcome = p.timeout_if_overdue(30.0 + OVERDUE_GRACE)
    assert outcome is not None and outcome.event["status"] == "timeout"
    assert poller().timeout_if_overdue(1e12) is None  # no deadline, never overdue


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-01-01T10:00:00.765994657Z", 1767261600.765994),  # Replicate's nanoseconds
        ("2026-01-01T10:00:00.5Z", 1767261600.5),
        ("2026-01-01T10:00:00", 1767261600.0),  # no zone: UTC, whatever the worker's local time
        ("2026-01-01T12:00:00+02:00", 1767261600.0),
        ("yesterday", None),
        (None, None),
    ],
)
def test_api_timestamps_are_read_as_utc_epoch_seconds(raw, expected, monkeypatch):
    import time as time_module

    from airflow_comet.hooks._protocol import iso_epoch

    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time_module.tzset()
    try:
        assert iso_epoch(raw) == (pytest.approx(expected) if expected is not None else None)
    finally:
        monkeypatch.undo()
        time_module.tzset()


def test_a_rejected_certificate_mid_wait_is_counted_like_a_401_not_the_end_at_once():
    from airflow_comet.exceptions import CometAPICertificateError

    poller = PredictionPoller("p1", started_at=0.0, poll_interval=5)
    error = CometAPICertificateError("the TLS certificate of https://api.example was rejected")
    assert poller.on_error(error, 1.0).event is None
    assert poller.on_error(error, 2.0).event is None
    event = poller.on_error(error, 3.0).event
    assert event["status"] == "error" and "3 status checks in a row" in event["message"]
