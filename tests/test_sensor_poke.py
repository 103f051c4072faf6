"""PredictionSensor's checks in the worker (poke and reschedule modes, and the check before deferring): the
poller they decide with is told the real times, and no attribute of the sensor hides a method of the
waiting code it shares with the operator."""

from __future__ import annotations

import inspect
import time
from types import SimpleNamespace

import pytest

from airflow_comet.polling import PredictionPoller
from airflow_comet.sensors.prediction import PredictionSensor
from tests.conftest import set_connection
from tests.scripted_server import Answer, envelope, prediction

SUCCEEDED = prediction(status="succeeded", output=["https://x.example/a.png"])


@pytest.fixture
def times_told(monkeypatch) -> list[float]:
    """Every ``now`` and ``started_at`` a PredictionPoller is given (recorded, not replaced)."""
    told: list[float] = []
    original_init, on_prediction, on_error = PredictionPoller.__init__, PredictionPoller.on_prediction, PredictionPoller.on_error

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        told.append(self.started_at)

    monkeypatch.setattr(PredictionPoller, "__init__", init)
    monkeypatch.setattr(PredictionPoller, "on_prediction", lambda self, p, now: told.append(now) or on_prediction(self, p, now))
    monkeypatch.setattr(PredictionPoller, "on_error", lambda self, e, now: told.append(now) or on_error(self, e, now))
    return told


def _context() -> dict:
    return {"ti": SimpleNamespace(xcom_push=lambda key, value: None)}


def test_no_attribute_of_the_sensor_hides_a_method():
    sensor = PredictionSensor(task_id="wait", prediction_id="p1")
    hidden = [name for name in vars(sensor) if inspect.isfunction(inspect.getattr_static(PredictionSensor, name, None))]
    assert hidden == []


def test_poke_mode_decides_on_real_times(scripted, monkeypatch, times_told):
    set_connection(monkeypatch, scripted.url, max_retries=0)  # the 503 reaches the sensor as an error
    scripted.script(
        Answer(503, envelope("busy")), Answer(200, prediction(status="processing")), Answer(200, SUCCEEDED)
    )
    sensor = PredictionSensor(task_id="wait", prediction_id="p1", mode="poke")
    before = time.time()
    assert sensor.poke(_context()) is False  # the error
    assert sensor.poke(_context()) is False  # processing
    assert sensor.poke(_context()).xcom_value["status"] == "succeeded"
    after = time.time()
    assert len(times_told) == 4  # started_at, then one now per check
    assert all(before <= t <= after for t in times_told), times_told


def test_the_check_before_deferring_decides_on_real_times(scripted, times_told):
    scripted.script(Answer(200, SUCCEEDED))
    sensor = PredictionSensor(task_id="wait", prediction_id="p1", deferrable=True)
    before = time.time()
    assert sensor.execute(_context())["status"] == "succeeded"  # already done: no trigger
    assert len(times_told) == 2 and all(before <= t <= time.time() for t in times_told), times_told


def test_start_from_trigger_is_set_up_for_the_scheduler_or_refused_with_a_reason():
    """Airflow 3.3: the scheduler starts PredictionTrigger with the sensor's settings, prediction_id as the
    template it renders in the triggerer; older Airflow, or an XComArg it cannot resolve there, fail at parse
    time with the reason (the real run is tests/reliability/test_end_from_trigger.py)."""
    from airflow_comet.sensors.prediction import AIRFLOW_3_3_PLUS, PredictionSensor
    from tests.dagrun import DAG

    template = "{{ ti.xcom_pull(task_ids='create', map_indexes=-1) }}"
    if not AIRFLOW_3_3_PLUS:
        with pytest.raises(ValueError, match="needs Airflow >= 3.3"):
            PredictionSensor(task_id="w", prediction_id=template, start_from_trigger=True)
        return
    sensor = PredictionSensor(
        task_id="w", prediction_id=template, start_from_trigger=True, end_from_trigger=True, timeout=600,
        poke_interval=7,
    )
    assert sensor.start_from_trigger is True
    assert sensor.start_trigger_args.trigger_cls == "airflow_comet.triggers.prediction.PredictionTrigger"
    kwargs = sensor.start_trigger_args.trigger_kwargs
    assert kwargs["prediction_id"] == template and kwargs["timeout"] == 600 and kwargs["end_from_trigger"] is True
    assert kwargs["poll_interval"] == 7
    assert PredictionSensor(task_id="plain", prediction_id="abc").start_from_trigger is False
    with DAG("t_sft", schedule=None):
        from airflow_comet.operators.prediction import CreatePredictionOperator

        create = CreatePredictionOperator(task_id="create", model="a/b", input={"prompt": "x"})
        with pytest.raises(ValueError, match="XComArg"):
            PredictionSensor(task_id="w2", prediction_id=create.output, start_from_trigger=True)
