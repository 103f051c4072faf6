"""End to end on a real Airflow deployment, driven only through the REST API.

Airflow 3.3: api-server, scheduler (LocalExecutor on SQLite), dag-processor, triggerer. Airflow 2.11:
webserver, scheduler (SequentialExecutor on SQLite, parsing too), triggerer. Plus the CometAPI simulator;
each component is its own process."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.deployment import AirflowDeployment, airflow_version, unsupported_reason

_UNSUPPORTED = unsupported_reason(airflow_version())
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_UNSUPPORTED is not None, reason=_UNSUPPORTED or "")]

DAG_ID = "comet_create_and_sense"
PROMPT = "e2e: a paper boat on calm water"


def test_create_and_sense_defers_and_succeeds(
    airflow_deployment: AirflowDeployment, request: pytest.FixtureRequest
) -> None:
    t0 = time.monotonic()
    dep = airflow_deployment
    sim = dep.simulator
    assert sim is not None
    sim.reset()  # the deployment is shared by the module: count only this test's requests
    key = dep.config.api_key

    dep.wait_for_dag(DAG_ID, timeout=60)
    run, watcher = dep.run_and_wait(DAG_ID, conf={"prompt": PROMPT}, timeout=120)
    run_id = run["dag_run_id"]
    report = f"{watcher.summary()}\n{dep.run_report(DAG_ID, run_id)}"

    # -- the run, and the sensor really waited in the triggerer -------------------------------------------
    assert run["state"] == "success", f"run ended {run['state']}\n{report}\n{dep.diagnostics()}"
    tis = {ti["task_id"]: ti for ti in dep.api.task_instances(DAG_ID, run_id)}
    assert {tid: ti["state"] for tid, ti in tis.items()} == {"create": "success", "wait": "success"}, report
    assert tis["create"]["try_number"] == 1 and tis["wait"]["try_number"] == 1, report
    assert "deferred" in watcher.states_of("wait"), f"`wait` was never seen deferred\n{report}"

    trigger_logs = dep.trigger_log_files(DAG_ID, run_id, "wait")
    assert trigger_logs, f"no trigger log under {dep.task_log_dir(DAG_ID, run_id, 'wait')}\n{report}"
    trigger_text = "\n".join(p.read_text() for p in trigger_logs)

    # -- XComs: the prediction id, then the final prediction object -----------------------------------------
    prediction_id = dep.api.xcom(DAG_ID, run_id, "create")
    assert isinstance(prediction_id, str) and prediction_id, f"create's return_value: {prediction_id!r}"
    creates = [r for r in sim.requests(endpoint="create") if r["status"] < 300]
    assert [r["prediction_id"] for r in creates] == [prediction_id], f"creates seen by the simulator: {creates}"
    assert [p["id"] for p in sim.predictions()] == [prediction_id]
    # The key reached the API (so the absence checks below mean something).
    assert creates[0]["headers"].get("Authorization") == f"Bearer {key}"
    assert prediction_id in trigger_text, trigger_text[-3000:]

    prediction = dep.api.xcom(DAG_ID, run_id, "wait")
    assert isinstance(prediction, dict), f"wait's return_value: {prediction!r}"
    assert prediction["id"] == prediction_id
    assert prediction["status"] == "succeeded"
    assert isinstance(prediction["output"], list) and prediction["output"], prediction
    assert all(isinstance(url, str) and url.startswith("http") for url in prediction["output"]), prediction
    assert prediction["input"]["prompt"] == PROMPT  # the run's conf reached the templated input
    status_polls = sim.requests(endpoint="status", prediction_id=prediction_id)
    assert status_polls, "nobody polled the prediction"

    # -- the key never lands in logs or XComs --------------------------------------------------------------
    task_logs = dep.task_log_files(DAG_ID, run_id, "create") + dep.task_log_files(DAG_ID, run_id, "wait")
    assert task_logs, f"no task logs under {dep.logs_dir}"
    leaked = dep.files_containing(key, task_logs + trigger_logs)
    assert not leaked, f"the API key appears in {leaked}"
    leaked_anywhere = dep.files_containing(key)  # every file under AIRFLOW_HOME/logs
    assert not leaked_anywhere, f"the API key appears in {leaked_anywhere}"
    assert key not in json.dumps(prediction_id) and key not in json.dumps(prediction)

    wall = time.monotonic() - t0
    request.node.user_properties.append(("e2e_test_seconds", round(wall, 1)))
    request.node.user_properties.append(("e2e_startup_seconds", round(dep.timings.get("ready", 0.0), 1)))
    print(
        f"\n[e2e] {DAG_ID}: test body {wall:.1f} s (deployment start-up {dep.timings.get('ready', 0):.1f} s); "
        f"wait states: {' -> '.join(map(str, watcher.states_of('wait')))}; "
        f"{len(status_polls)} status polls; trigger log {trigger_logs[0].name}"
    )
