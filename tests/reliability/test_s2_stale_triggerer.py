"""Scenario 2: a triggerer stalls (SIGSTOP) past the health threshold, its trigger moves to the other
triggerer, and the stale one is resumed (SIGCONT).

On resuming, Airflow 3.3.2's stale triggerer finds it no longer owns the trigger and calls the trigger's
``on_kill`` as if a person had stopped the task (apache/airflow#73454). Promise: the prediction is not
cancelled (the trigger checks the task instance, still deferred), the other triggerer finishes the wait and
the task succeeds with one prediction.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.deployment import AirflowDeployment
from tests.reliability.common import AIRFLOW33, DEV, needs_33, report
from tests.reliability.helpers import (
    cancels,
    component_of_job,
    creates,
    fresh_simulator,
    is_stopped,
    poll_figures,
    running_trigger,
    signal_component,
    start_run,
    status_checks,
    trigger_log,
    trigger_moved,
    TRIGGER_STARTED,
    wait,
)

SKIP_REASON = needs_33(
    "the stale-triggerer on_kill (apache/airflow#73454) is a 3.3 behaviour, and two triggerers need the PostgreSQL deployment (3.3 only here)"
)
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not AIRFLOW33, reason=SKIP_REASON)]

DAG_ID = "rel_single"


def test_stale_triggerer_losing_its_trigger_does_not_cancel(
    rel_deployment: AirflowDeployment, request: pytest.FixtureRequest
) -> None:
    dep = rel_deployment
    t0 = time.monotonic()
    sim = fresh_simulator(dep, durations=50)
    run_id = start_run(dep, DAG_ID, conf={"model": DEV, "prompt": "scenario 2"})
    stale_job = running_trigger(dep, DAG_ID, run_id, "generate")
    stale = component_of_job(dep, stale_job)

    stopped = time.monotonic()
    signal_component(stale, signal.SIGSTOP)
    try:
        assert wait(dep, lambda: is_stopped(stale.pid), 5, f"{stale.name} to stop")
        checks_before = len(status_checks(dep, DAG_ID, run_id, "generate"))  # the stale one can send no more
        new_job = trigger_moved(
            dep, DAG_ID, run_id, "generate", away_from=stale_job, what="the trigger to move to the other triggerer"
        )
        moved_seconds = time.monotonic() - stopped
        wait(
            dep,
            lambda: TRIGGER_STARTED.search(trigger_log(dep, DAG_ID, run_id, "generate", new_job))
            and len(status_checks(dep, DAG_ID, run_id, "generate")) > checks_before,
            60,
            "the other triggerer to poll",
        )
    finally:
        signal_component(stale, signal.SIGCONT)
    paused_seconds = time.monotonic() - stopped

    # The stale triggerer wakes up, finds the trigger gone and calls on_kill (Airflow 3.3.2), which must not cancel.
    def stale_done() -> str | None:
        text = trigger_log(dep, DAG_ID, run_id, "generate", stale_job)
        return text if "trigger completed" in text else None

    stale_log = wait(dep, stale_done, 90, f"{stale.name} to let go of the trigger")
    on_kill_called = "invoking on_kill" in stale_log
    if on_kill_called:
        assert "Not cancelling prediction" in stale_log and "still deferred" in stale_log, stale_log[-3000:]
    run = dep.wait_for_run(DAG_ID, run_id, timeout=180)
    requests = sim.requests()
    prediction_id = creates(requests)[0]["prediction_id"]
    assert run["state"] == "success", dep.run_report(DAG_ID, run_id)
    assert cancels(requests) == [], "the stale triggerer cancelled a healthy prediction"
    assert len(creates(requests)) == 1 and len(sim.predictions()) == 1
    assert sim.predictions()[0]["status"] == "succeeded"
    ti = dep.api.task_instance(DAG_ID, run_id, "generate")
    assert ti["try_number"] == 1
    assert stale.alive, f"{stale.name} died after SIGCONT\n{stale.tail()}"
    report(
        request,
        2,
        outcome=f"task {ti['state']}, cancels {len(cancels(requests))}, stale on_kill called={on_kill_called}",
        creates=len(creates(requests)),
        asked=1,
        seconds_to_reassign=round(moved_seconds, 1),
        seconds_paused=round(paused_seconds, 1),
        seconds=round(time.monotonic() - t0, 1),
        **poll_figures(requests, [prediction_id]),
    )
