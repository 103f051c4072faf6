"""PredictionTrigger against the simulator: serialization, its one event per run, manners in the loop."""

from __future__ import annotations

import asyncio
import importlib
import logging
import time

import pytest

from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.testing import Faults
from airflow_comet.triggers.prediction import PredictionTrigger
from tests.conftest import API_KEY


def create(sim, **faults) -> str:
    if faults:
        sim.set_faults(Faults(**faults))
    return CometAPIHook().create_prediction("black-forest-labs/flux-schnell", {"prompt": "a paper boat"})["id"]


def rebuild(trigger: PredictionTrigger) -> PredictionTrigger:
    """What the triggerer does: import the class path from serialize() and call it with the kwargs."""
    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)(**kwargs)


async def events(trigger: PredictionTrigger, limit: float = 30) -> list[dict]:
    """Every event the trigger fires, stopping when its run() ends (or failing after ``limit`` s)."""

    async def collect() -> list[dict]:
        return [event.payload async for event in trigger.run()]

    return await asyncio.wait_for(collect(), limit)


def test_serialize_round_trip_keeps_every_argument():
    trigger = PredictionTrigger(
        "abc", cometapi_conn_id="other", poll_interval=7, started_at=100.0, end_time=200.0, cancel_on_kill=False,
        end_from_trigger=True, return_value="id", fail_on_error=False,
    )
    again = rebuild(trigger)
    assert again.serialize() == trigger.serialize()
    assert trigger.serialize()[1] == {
        "prediction_id": "abc",
        "cometapi_conn_id": "other",
        "poll_interval": 7.0,
        "started_at": 100.0,
        "end_time": 200.0,
        "cancel_on_kill": False,
        "end_from_trigger": True,
        "return_value": "id",
        "fail_on_error": False,
    }


async def test_succeeded_prediction_fires_one_event_over_one_connection(sim):
    prediction_id = create(sim)
    trigger = rebuild(PredictionTrigger(prediction_id, poll_interval=5))
    [event] = await events(trigger)
    assert event["status"] == "succeeded"
    assert event["prediction_id"] == prediction_id
    assert event["prediction"]["status"] == "succeeded"
    assert event["prediction"]["output"][0].startswith(sim.delivery_url)
    # One pool of connections for the whole wait, and a short prediction costs only a few polls.
    assert sim.connections_opened("api") == 2  # one for the create above, one for the trigger
    assert 1 <= len(sim.polls(prediction_id)) <= 3
    assert API_KEY not in repr(event)


async def test_failed_prediction_event_carries_the_api_error(sim):
    prediction_id = create(sim, durations=0.3, fail_rate=1.0, fail_message="NSFW content detected")
    [event] = await events(PredictionTrigger(prediction_id))
    assert event["status"] == "failed"
    assert prediction_id in event["message"] and "NSFW content detected" in event["message"]


async def test_deadline_gives_a_timeout_event_without_cancelling(sim):
    prediction_id = create(sim, never_finish=True)
    started = time.monotonic()
    [event] = await events(PredictionTrigger(prediction_id, end_time=time.time() + 2))
    assert event["status"] == "timeout"
    assert 1.5 <= time.monotonic() - started <= 5
    assert "deadline" in event["message"]
    # Cancelling is execute_complete's job, so that the failure and the cancel are reported together.
    assert sim.cancels(prediction_id) == []


async def _ending_events(trigger: PredictionTrigger, limit: float = 30) -> list:
    async def collect() -> list:
        return [event async for event in rebuild(trigger).run()]

    return await asyncio.wait_for(collect(), limit)


@pytest.mark.parametrize("returns", ["prediction", "id"])
async def test_end_from_trigger_ends_the_task_with_its_xcoms(sim, returns):
    from airflow.triggers.base import TaskSuccessEvent

    prediction_id = create(sim, durations=0.3)
    [event] = await _ending_events(PredictionTrigger(prediction_id, end_from_trigger=True, return_value=returns))
    assert isinstance(event, TaskSuccessEvent)
    if returns == "id":
        assert event.xcoms["return_value"] == prediction_id
        assert event.xcoms["prediction"]["status"] == "succeeded"
    else:
        assert event.xcoms["return_value"]["id"] == prediction_id
        assert event.xcoms["return_value"]["output"][0].startswith(sim.delivery_url)


@pytest.mark.parametrize("fail_on_error", [True, False])
async def test_end_from_trigger_with_a_refused_prompt(sim, fail_on_error):
    from airflow.triggers.base import TaskFailedEvent, TaskSuccessEvent

    prediction_id = create(sim, durations=0.3, fail_rate=1.0)
    trigger = PredictionTrigger(prediction_id, end_from_trigger=True, fail_on_error=fail_on_error)
    [event] = await _ending_events(trigger)
    if fail_on_error:
        assert isinstance(event, TaskFailedEvent)
    else:
        assert isinstance(event, TaskSuccessEvent) and event.xcoms["return_value"]["status"] == "failed"


async def test_end_from_trigger_cancels_at_the_deadline_and_fails_the_task(sim):
    from airflow.triggers.base import TaskFailedEvent

    prediction_id = create(sim, never_finish=True)
    trigger = PredictionTrigger(prediction_id, end_time=time.time() + 2, end_from_trigger=True)
    [event] = await _ending_events(trigger)
    assert isinstance(event, TaskFailedEvent)
    # No execute_complete will run to cancel it: the trigger does, once.
    assert len(sim.cancels(prediction_id)) == 1


async def test_flaky_polls_do_not_fail_the_wait(sim):
    prediction_id = create(sim, durations=2.0, poll_5xx_rate=0.6)
    [event] = await events(PredictionTrigger(prediction_id, poll_interval=1))
    assert event["status"] == "succeeded"
    assert any(r.status >= 500 for r in sim.polls(prediction_id))


async def test_revoked_key_ends_with_an_error_event(sim, monkeypatch):
    from tests.conftest import set_connection

    prediction_id = create(sim, durations=60)
    set_connection(monkeypatch, sim.base_url, key="sk-revoked")
    [event] = await events(PredictionTrigger(prediction_id, poll_interval=1))
    assert event["status"] == "error"
    assert "401" in event["message"] and "sk-revoked" not in event["message"]
    assert len(sim.polls(prediction_id)) == 3


async def test_html_answers_give_up_after_a_bounded_number_of_polls(sim):
    prediction_id = create(sim, durations=60)
    sim.set_faults(Faults(durations=60, html_rate=1.0, html_statuses=(200,)))
    [event] = await events(PredictionTrigger(prediction_id, poll_interval=0.5), limit=60)
    assert event["status"] == "error"
    assert "text/html" in event["message"]
    assert len(sim.polls(prediction_id)) == 10


async def test_missing_connection_is_an_error_event_not_a_crash(monkeypatch):
    from airflow_comet.triggers import prediction

    monkeypatch.setattr(prediction, "LOOKUP_PAUSES", (0.05, 0.05))  # asked again: Airflow says "not found"
    monkeypatch.delenv("AIRFLOW_CONN_COMETAPI_DEFAULT", raising=False)  # for an outage too
    started = time.monotonic()
    [event] = await events(PredictionTrigger("abc", cometapi_conn_id="nope"))
    assert event["status"] == "error" and "nope" in event["message"]
    assert event["prediction"] is None  # no status check was made
    assert 0.1 <= time.monotonic() - started < 5


class _StateTrigger(PredictionTrigger):
    """The task-state lookup needs a running API server; here the state is given."""

    state: str | None = None

    async def _task_state(self) -> str | None:
        return self.state


@pytest.mark.parametrize(("state", "cancelled"), [("failed", True), ("success", True), ("deferred", False), (None, False)])
async def test_on_kill_cancels_only_when_the_task_really_stopped(sim, state, cancelled):
    prediction_id = create(sim, durations=60)
    trigger = _StateTrigger(prediction_id)
    trigger.state = state
    await trigger.on_kill()
    assert len(sim.cancels(prediction_id)) == (1 if cancelled else 0)
    assert (sim.prediction(prediction_id)["status"] == "canceled") is cancelled


async def test_on_kill_respects_cancel_on_kill_false(sim):
    prediction_id = create(sim, durations=60)
    trigger = _StateTrigger(prediction_id, cancel_on_kill=False)
    trigger.state = "failed"
    await trigger.on_kill()
    assert sim.cancels(prediction_id) == []


async def test_log_says_each_nonsense_answer_each_status_change_and_how_the_wait_ended(sim, caplog, capsys):
    caplog.set_level(logging.INFO)
    prediction_id = create(sim, durations=4)
    sim.set_faults(Faults(durations=4, unknown_status="warming_up"))
    trigger = PredictionTrigger(prediction_id, poll_interval=0.5, started_at=time.time() - 30)

    async def two_polls_then_healthy() -> None:
        while len(sim.polls(prediction_id)) < 2:
            await asyncio.sleep(0.05)
        sim.set_faults(Faults(durations=4))

    healer = asyncio.ensure_future(two_polls_then_healthy())
    [event] = await events(trigger, limit=30)
    await healer
    # Airflow 3 logs through structlog to stdout, Airflow 2 through logging: read both.
    logged = caplog.text + capsys.readouterr().out
    assert event["status"] == "succeeded"
    assert logged.count("the answer has no known status (status='warming_up')") >= 2
    assert f"Prediction {prediction_id} succeeded. (" in logged and "status checks in" in logged
    # The first status that made sense, and the changes after it, at Airflow's default level: a person
    # watching the run sees the prediction move, as dbt Cloud's and Databricks' triggers show theirs.
    assert f"Prediction {prediction_id} is processing" in logged
    assert API_KEY not in logged
