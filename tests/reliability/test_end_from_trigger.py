"""Scenario: mapped create-and-wait with end_from_trigger on the real deployment (Airflow 3.3).

Promise: each task is ended by its trigger, so a prediction costs one worker run (the create, up to the
deferral) instead of two; the task's XComs are what execute_complete would have pushed (the id as
return_value, the final prediction under ``prediction``); a refused prompt is handed on
(``fail_on_error=False``), its task succeeding with the failed prediction. A sensor with
``start_from_trigger`` and ``end_from_trigger`` waits for a prediction with no worker run at all, its
templated ``prediction_id`` rendered in the triggerer.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

from tests.e2e.deployment import AirflowDeployment
from tests.reliability.common import AIRFLOW33, needs_33, report
from tests.reliability.helpers import creates, fresh_simulator, start_run, task_instances

SKIP_REASON = needs_33("end_from_trigger's failure events honour retries from 3.3; the PostgreSQL deployment is 3.3 only here")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not AIRFLOW33, reason=SKIP_REASON)]

DAG_ID = "rel_end_from_trigger"
PROMPTS = ["a paper boat", "a forbidden fox", "a red lighthouse", "a city of books", "a tram", "an owl"]
#: The supervisor logs one of these per worker run of a task instance (see benchmarks/real_airflow.py).
_WORKLOAD = re.compile(r"Workload finished .*?workload_id=([0-9a-f-]+)")


def test_the_trigger_ends_each_task_with_one_worker_run(rel_deployment: AirflowDeployment, request) -> None:
    dep = rel_deployment
    t0 = time.monotonic()
    sim = fresh_simulator(dep, durations=[2.0, 6.0], refused_words=["forbidden"])
    scheduler_log = dep.components["scheduler-0"].log_path
    offset = scheduler_log.stat().st_size

    run_id = start_run(dep, DAG_ID, conf={"prompts": PROMPTS})
    run = dep.wait_for_run(DAG_ID, run_id, timeout=300)

    assert run["state"] == "success", dep.run_report(DAG_ID, run_id)
    generate = sorted(
        (ti for ti in task_instances(dep, DAG_ID, run_id) if ti["task_id"] == "generate"), key=lambda ti: ti["map_index"]
    )
    assert [ti["state"] for ti in generate] == ["success"] * len(PROMPTS)
    statuses = []
    for ti in generate:
        prediction_id = dep.api.xcom(DAG_ID, run_id, "generate", map_index=ti["map_index"])
        prediction = dep.api.xcom(DAG_ID, run_id, "generate", "prediction", map_index=ti["map_index"])
        assert prediction["id"] == prediction_id
        statuses.append(prediction["status"])
    assert statuses == ["failed" if "forbidden" in p else "succeeded" for p in PROMPTS]
    tis = {(ti["task_id"], ti["map_index"]): ti for ti in task_instances(dep, DAG_ID, run_id)}
    assert tis[("wait", -1)]["state"] == "success"
    waited = dep.api.xcom(DAG_ID, run_id, "wait")
    assert waited["id"] == dep.api.xcom(DAG_ID, run_id, "create") and waited["status"] == "succeeded"
    assert len(creates(sim.requests())) == len(PROMPTS) + 1

    def runs_per_task() -> Counter:
        text = scheduler_log.read_bytes()[offset:].decode(errors="replace")
        return Counter(wid for wid in _WORKLOAD.findall(text) if wid in {ti["id"] for ti in tis.values()})

    # The supervisor logs a run's line once its process has gone, possibly after the task's state changed.
    expected = {ti["id"] for ti in generate} | {tis[("inputs", -1)]["id"], tis[("create", -1)]["id"]}
    dep.wait_until(lambda: set(runs_per_task()) >= expected, time.monotonic() + 60, "each task's worker run")
    time.sleep(3)  # a second run of any task would be logged by now
    runs = runs_per_task()
    assert sorted(runs[ti["id"]] for ti in generate) == [1] * len(PROMPTS), runs
    assert runs[tis[("wait", -1)]["id"]] == 0, runs  # started and ended in the triggerer
    report(
        request,
        "end_from_trigger",
        outcome=f"run {run['state']}",
        tasks=len(generate),
        worker_runs=sum(runs[ti["id"]] for ti in generate),
        sensor_worker_runs=runs[tis[("wait", -1)]["id"]],
        creates=len(creates(sim.requests())),
        seconds=round(time.monotonic() - t0, 1),
    )
