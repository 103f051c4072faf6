"""Scenario 3: the triggerer that is polling a prediction is killed (SIGKILL, process group included).

Promise: the other triggerer takes the trigger over once the dead one's heartbeat is older than the health
threshold, the task succeeds, and exactly one prediction exists (the wait never creates). A new triggerer is
started afterwards so the following scenarios have two again.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.deployment import AirflowDeployment
from tests.reliability.common import AIRFLOW33, DEV, needs_33, report
from tests.reliability.helpers import (
    add_mapped_triggerer,
    cancels,
    component_of_job,
    creates,
    fresh_simulator,
    live_triggerers,
    poll_figures,
    running_trigger,
    start_run,
    trigger_log,
    trigger_moved,
)

SKIP_REASON = needs_33(
    "two triggerers need the PostgreSQL deployment, which runs on 3.3 only here (no psycopg2 in the 2.11 lock)"
)
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not AIRFLOW33, reason=SKIP_REASON)]

DAG_ID = "rel_single"


def test_killed_triggerer_is_replaced_and_the_task_succeeds_with_one_prediction(
    rel_deployment: AirflowDeployment, request: pytest.FixtureRequest
) -> None:
    dep = rel_deployment
    t0 = time.monotonic()
    sim = fresh_simulator(dep, durations=40)
    run_id = start_run(dep, DAG_ID, conf={"model": DEV, "prompt": "scenario 3"})
    dead_job = running_trigger(dep, DAG_ID, run_id, "generate")
    victim = component_of_job(dep, dead_job)

    killed = time.monotonic()
    dep.stop_component(victim.name, sig=signal.SIGKILL)
    assert not victim.alive
    new_job = trigger_moved(
        dep, DAG_ID, run_id, "generate", away_from=dead_job, what="another triggerer to take the trigger over"
    )
    takeover_seconds = time.monotonic() - killed
    run = dep.wait_for_run(DAG_ID, run_id, timeout=180)
    requests = sim.requests()
    assert run["state"] == "success", dep.run_report(DAG_ID, run_id)
    assert len(creates(requests)) == 1, creates(requests)
    assert len(sim.predictions()) == 1 and sim.predictions()[0]["status"] == "succeeded"
    assert cancels(requests) == []
    assert "succeeded" in trigger_log(dep, DAG_ID, run_id, "generate", new_job)
    ti = dep.api.task_instance(DAG_ID, run_id, "generate")
    assert ti["try_number"] == 1
    prediction_id = creates(requests)[0]["prediction_id"]
    figures = poll_figures(requests, [prediction_id])

    # Back to two triggerers for the scenarios that follow.
    name, job = add_mapped_triggerer(dep)
    assert len(live_triggerers(dep)) == 2, live_triggerers(dep)
    report(
        request,
        3,
        outcome=f"task {ti['state']} on try {ti['try_number']}, trigger moved job {dead_job} -> {new_job}",
        creates=len(creates(requests)),
        asked=1,
        predictions=len(sim.predictions()),
        seconds_to_takeover=round(takeover_seconds, 1),
        seconds=round(time.monotonic() - t0, 1),
        replacement=f"{name}(job {job})",
        **figures,
    )
