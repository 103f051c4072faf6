"""How a wait that ran out of time ends the task: the error raised and what the message says about the cancel,
against the simulator (the event is the one the trigger fires at its deadline)."""

from __future__ import annotations

import pytest
from airflow.providers.common.compat.sdk import AirflowSensorTimeout, AirflowTaskTimeout

from airflow_comet.exceptions import PredictionFailedError
from airflow_comet.operators.prediction import CreatePredictionOperator
from airflow_comet.sensors.prediction import PredictionSensor
from tests.test_dags import FLUX
from tests.test_trigger import create


def _timeout_event(prediction_id: str) -> dict:
    return {"status": "timeout", "prediction_id": prediction_id, "prediction": None, "message": "Out of time."}


def test_a_timeout_says_the_prediction_was_cancelled_only_when_it_was(sim):
    cancelled = create(sim, never_finish=True)
    operator = CreatePredictionOperator(task_id="gen", model=FLUX, input={"prompt": "x"})
    with pytest.raises(PredictionFailedError, match="It was cancelled"):
        operator._finish(_timeout_event(cancelled))
    assert sim.prediction(cancelled)["status"] == "canceled"

    still_running = create(sim, never_finish=True, cancel_unsupported=True)
    operator = CreatePredictionOperator(task_id="gen2", model=FLUX, input={"prompt": "x"})
    with pytest.raises(PredictionFailedError) as info:
        operator._finish(_timeout_event(still_running))
    assert "could not cancel it" in str(info.value) and "may still be running" in str(info.value)
    assert "It was cancelled" not in str(info.value)
    assert len(sim.cancels(still_running)) == 1  # asked once; the API has no cancel endpoint
    assert sim.prediction(still_running)["status"] in ("starting", "processing")  # not canceled


@pytest.mark.parametrize(
    ("deadline_is_task_timeout", "expected"),
    [(False, AirflowSensorTimeout), (True, AirflowTaskTimeout)],
)
def test_a_deferred_sensor_out_of_time_raises_what_a_poking_one_does(sim, deadline_is_task_timeout, expected):
    # The sensor's own timeout: AirflowSensorTimeout, as in poke mode (no retry; soft_fail skips). The task's
    # execution_timeout: AirflowTaskTimeout, as for any task.
    prediction_id = create(sim, never_finish=True)
    sensor = PredictionSensor(task_id="wait", prediction_id=prediction_id, deferrable=True, timeout=5)
    with pytest.raises(expected, match="Out of time. It was cancelled") as info:
        sensor.execute_complete({}, event=_timeout_event(prediction_id), deadline_is_task_timeout=deadline_is_task_timeout)
    assert not isinstance(info.value, PredictionFailedError)
    assert sim.prediction(prediction_id)["status"] == "canceled"


@pytest.mark.parametrize("mode", ["poke", "reschedule"])
def test_a_sensor_gives_up_on_a_prediction_that_does_not_exist_in_every_mode(sim, mode):
    def new_sensor() -> PredictionSensor:
        return PredictionSensor(task_id="wait", prediction_id="no-such-prediction", mode=mode, timeout=60)

    sensor = new_sensor()
    with pytest.raises(PredictionFailedError, match="3 status checks in a row failed"):
        for _ in range(5):
            assert sensor.poke({}) is False
            if mode == "reschedule":  # each poke of a rescheduled sensor runs in a new task instance
                sensor = new_sensor()
    assert len(sim.polls("no-such-prediction")) == 3
