"""The operator's on_kill after a resume knows its prediction (no deployment needed).

Airflow 2 compares ``execution_timeout`` with the task's first start when a deferred task resumes; if it has
passed (the trigger's deadline carried execution_timeout, so it has, by a few seconds) Airflow raises
AirflowTaskTimeout and calls ``on_kill`` without calling ``execute_complete``. The resumed operator is a fresh
object: before the fix ``on_kill`` had no prediction id and the never-finishing prediction was left running
(scenario 5 on Airflow 2.11 found it). ``pre_execute`` now takes the id from the trigger event.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from airflow_comet.operators.prediction import CreatePredictionOperator
from airflow_comet.sensors.prediction import PredictionSensor
from tests.test_trigger import create


def _resumed_context(prediction_id: str) -> dict:
    event = {"status": "timeout", "prediction_id": prediction_id, "prediction": None, "message": "deadline"}
    return {"ti": SimpleNamespace(next_kwargs={"event": event}, task_id="generate")}


def _deferrable_operator() -> CreatePredictionOperator:
    """A create that waits for its prediction in the triggerer (as scenario 5's tasks do)."""
    return CreatePredictionOperator(
        task_id="generate",
        model="black-forest-labs/flux-schnell",
        input={"prompt": "x"},
        wait_for_completion=True,
        deferrable=True,
    )


def test_operator_on_kill_after_resume_cancels_the_prediction(sim):
    prediction_id = create(sim, durations=120)
    op = _deferrable_operator()
    op.pre_execute(_resumed_context(prediction_id))
    op.on_kill()
    assert len(sim.cancels(prediction_id)) == 1
    assert sim.prediction(prediction_id)["status"] == "canceled"


def test_fresh_operator_without_an_event_cancels_nothing(sim):
    prediction_id = create(sim, durations=120)
    op = CreatePredictionOperator(task_id="generate", model="black-forest-labs/flux-schnell", input={"prompt": "x"})
    op.pre_execute({"ti": SimpleNamespace(next_kwargs=None, task_id="generate")})
    op.on_kill()
    assert sim.cancels(prediction_id) == []


def test_cancelled_after_timeout_is_not_cancelled_again_by_on_kill(sim):
    """execute_complete cancels, raises AirflowTaskTimeout, and Airflow then calls on_kill: one cancel only."""
    prediction_id = create(sim, durations=120)
    op = _deferrable_operator()
    op.pre_execute(_resumed_context(prediction_id))
    event = _resumed_context(prediction_id)["ti"].next_kwargs["event"]
    with pytest.raises(BaseException, match="It was cancelled") as raised:  # AirflowTaskTimeout
        op.execute_complete({"ti": SimpleNamespace(xcom_push=lambda **_: None)}, event, deadline_is_task_timeout=True)
    assert type(raised.value).__name__ == "AirflowTaskTimeout"
    op.on_kill()
    assert len(sim.cancels(prediction_id)) == 1


def test_sensor_pre_execute_keeps_its_prediction(sim):
    prediction_id = create(sim, durations=120)
    sensor = PredictionSensor(task_id="wait", prediction_id=prediction_id, deferrable=True)
    sensor.pre_execute(_resumed_context(prediction_id))
    sensor.on_kill()
    assert len(sim.cancels(prediction_id)) == 1


class _FailedByTheScheduler(SimpleNamespace):
    """A task instance Airflow 2's scheduler resumed with ``__fail__``: no event, only its own XCom."""

    def xcom_pull(self, *, task_ids: str, key: str, map_indexes: int):
        self.pulled = (task_ids, key, map_indexes)
        return self.xcom.get((task_ids, key, map_indexes))


@pytest.mark.parametrize("map_index", [-1, 3])
def test_operator_on_kill_after_a_resume_without_the_event_cancels_the_prediction_it_deferred_on(sim, map_index):
    """Airflow 2's scheduler fails a deferred task at its execution_timeout with next_method ``__fail__`` and
    next_kwargs replaced; the id comes from the XCom the operator pushed before deferring (scenario 5b runs
    the real thing)."""
    prediction_id = create(sim, durations=120)
    op = _deferrable_operator()
    ti = _FailedByTheScheduler(
        next_method="__fail__",
        next_kwargs={"error": "Trigger/execution timeout"},
        task_id="generate",
        map_index=map_index,
        xcom={("generate", "deferred_prediction_id", map_index): prediction_id},
    )
    op.pre_execute({"ti": ti})
    assert ti.pulled == ("generate", "deferred_prediction_id", map_index)
    op.on_kill()
    assert len(sim.cancels(prediction_id)) == 1


def test_a_resume_without_the_event_or_its_xcom_cancels_nothing(sim):
    prediction_id = create(sim, durations=120)
    op = _deferrable_operator()
    ti = _FailedByTheScheduler(next_method="__fail__", next_kwargs={}, task_id="generate", map_index=-1, xcom={})
    op.pre_execute({"ti": ti})
    op.on_kill()
    assert sim.cancels(prediction_id) == []
