"""Scenario 5: predictions that never finish.

On Airflow 2.11 the ``execution_timeout`` case ends differently but keeps the promise: Airflow counts
execution_timeout from the first start when the task resumes, raises AirflowTaskTimeout before
``execute_complete`` and calls ``on_kill``, which cancels (the operator learns the id from the trigger event).

Promise: the task fails at its deadline — the operator's ``timeout`` (carried by the trigger, which fires a
``timeout`` event) or the task's ``execution_timeout`` (Airflow 3.3.2 does not enforce it while a task is
deferred, so the trigger carries it too; the task then fails with AirflowTaskTimeout) — and the prediction is
cancelled, once.
"""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from tests.e2e.deployment import AirflowDeployment
from tests.reliability.common import AIRFLOW33, VERSION, report
from tests.reliability.helpers import cancels, creates, fresh_simulator, start_run, task_error

pytestmark = [pytest.mark.e2e]

DAG_ID = "rel_timeouts"
DEADLINES = {"trigger_deadline": 20, "execution_timeout": 25}  # as in dags/rel_timeouts.py
ERRORS = {"trigger_deadline": "PredictionFailedError", "execution_timeout": "AirflowTaskTimeout"}


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_never_finishing_predictions_fail_at_the_deadline_and_are_cancelled(
    basic_deployment: AirflowDeployment, request: pytest.FixtureRequest
) -> None:
    dep = basic_deployment
    t0 = time.monotonic()
    sim = fresh_simulator(dep, never_finish=True)
    run_id = start_run(dep, DAG_ID)
    run = dep.wait_for_run(DAG_ID, run_id, timeout=180)
    requests = sim.requests()
    assert run["state"] == "failed"
    made = {c["prediction_id"] for c in creates(requests)}
    assert len(made) == 2
    cancelled = [c["prediction_id"] for c in cancels(requests)]
    assert sorted(cancelled) == sorted(made), f"each prediction cancelled exactly once: {cancelled}"
    assert {p["status"] for p in sim.predictions()} == {"canceled"}

    figures = {}
    for task_id, deadline in DEADLINES.items():
        ti = dep.api.task_instance(DAG_ID, run_id, task_id)
        assert ti["state"] == "failed" and ti["try_number"] == 1, ti
        exc_type, message = task_error(dep, DAG_ID, run_id, task_id)
        assert exc_type == ERRORS[task_id], (exc_type, message)
        if AIRFLOW33 or task_id == "trigger_deadline":
            assert "did not finish by its deadline" in message and "It was cancelled" in message, message
        else:
            # Airflow 2 times the resumed task out before execute_complete runs (execution_timeout is counted
            # from the first start) and calls on_kill, which cancels: a bare AirflowTaskTimeout in the log.
            text = "\n".join(p.read_text() for p in dep.task_log_files(DAG_ID, run_id, task_id))
            assert "Cancelled prediction" in text, text[-3000:]
        took = _ts(ti["end_date"]) - _ts(ti["start_date"])
        # The trigger fires at the deadline; resuming the task to cancel and fail takes a few seconds more.
        assert deadline - 1 <= took <= deadline + 30, (task_id, took)
        figures[f"{task_id}_s"] = round(took, 1)
    report(
        request,
        5,
        airflow=".".join(map(str, VERSION)),
        outcome="both failed at their deadline (PredictionFailedError / AirflowTaskTimeout), both predictions cancelled once",
        creates=len(made),
        asked=2,
        cancels=len(cancelled),
        deadlines="timeout=20s,execution_timeout=25s",
        seconds=round(time.monotonic() - t0, 1),
        **figures,
    )


@pytest.mark.skipif(
    AIRFLOW33, reason="Airflow 3 never fails a deferred task for its execution_timeout in the scheduler"
)
def test_scheduler_timing_out_a_deferred_task_without_its_event_still_cancels(
    basic_deployment: AirflowDeployment, request: pytest.FixtureRequest
) -> None:
    """Airflow 2 sets a deferred task's trigger_timeout to start + execution_timeout, and the scheduler fails it
    ("__fail__", the event's kwargs replaced) when that passes before the trigger's own deadline event lands:
    with no triggerer running here, every time; with one, when the scheduler's check comes first (seen in CI).
    The resumed task times out at once and calls on_kill, which must still know the prediction to cancel."""
    dep = basic_deployment
    dag_id = "rel_timeouts_no_event"
    t0 = time.monotonic()
    sim = fresh_simulator(dep, never_finish=True)
    triggerers = [name for name, c in dep.components.items() if name.startswith("triggerer-") and c.alive]
    assert triggerers, "the deployment runs no triggerer"
    for name in triggerers:
        dep.stop_component(name)
    try:
        run_id = start_run(dep, dag_id)
        run = dep.wait_for_run(dag_id, run_id, timeout=120)
    finally:
        for name in triggerers:
            dep.restart_component(name)
    requests = sim.requests()
    assert run["state"] == "failed"
    made = [c["prediction_id"] for c in creates(requests)]
    assert len(made) == 1, made
    cancelled = [c["prediction_id"] for c in cancels(requests)]
    assert cancelled == made, f"the prediction cancelled exactly once: {cancelled}"
    assert {p["status"] for p in sim.predictions()} == {"canceled"}
    exc_type, message = task_error(dep, dag_id, run_id, "execution_timeout")
    assert exc_type == "AirflowTaskTimeout", (exc_type, message)
    text = "\n".join(p.read_text() for p in dep.task_log_files(dag_id, run_id, "execution_timeout"))
    assert "Cancelled prediction" in text, text[-3000:]
    report(
        request,
        "5b",
        airflow=".".join(map(str, VERSION)),
        outcome="no triggerer: the scheduler failed the deferred task at its execution_timeout; on_kill cancelled",
        creates=len(made),
        cancels=len(cancelled),
        seconds=round(time.monotonic() - t0, 1),
    )
