"""Scenario 7: answers that make no sense, and a key revoked mid-run.

Four predictions wait side by side (``rel_bad_answers``, one model each); per-model faults spoil the status
answers of three of them while ``control`` (flux-kontext-pro, 40 s) stays healthy. Two batches:

* a: HTML pages (200 text/html), truncated JSON, a missing ``status`` field;
* b: an unknown status, a 200 carrying an ``error`` envelope, and 30 % HTML/truncated answers (mixed).

Promise: a spoiled answer every time gives a clear task failure after a bounded number of polls (ten in a
row) naming what was wrong; an occasional one is a bounded retry and the task succeeds; never a hang, and
never a crash of the triggerer: ``control`` keeps being polled and succeeds, both triggerers stay up.

``test_key_revoked_mid_run``: the simulator is restarted with another key while a prediction is waited on
(every request now answers 401): the task fails after three 401s in a row with a message naming the
connection; the prediction cannot be cancelled (the key is gone).
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.deployment import AirflowDeployment
from tests.reliability.common import AIRFLOW33, DEV, KONTEXT, PRO, SCHNELL, VERSION, report
from tests.reliability.helpers import (
    cancels,
    creates,
    fresh_simulator,
    live_triggerers,
    polls_per_prediction,
    running_trigger,
    start_run,
    task_error,
    trigger_log,
    wait,
)

pytestmark = [pytest.mark.e2e]

DAG_ID = "rel_bad_answers"
TASK_OF = {SCHNELL: "on_schnell", DEV: "on_dev", PRO: "on_pro", KONTEXT: "control"}

#: batch -> model -> (faults, expected outcome, text the failure must contain)
BATCHES = {
    "a": {
        SCHNELL: ({"html_rate": 1.0, "html_statuses": [200]}, "failed", "answered 200 with text/html"),
        DEV: ({"truncated_json_rate": 1.0}, "failed", "instead of a JSON object"),
        PRO: ({"missing_fields": ["status"]}, "failed", "no known status (status=None)"),
    },
    "b": {
        SCHNELL: ({"unknown_status": "weird"}, "failed", "no known status (status='weird')"),
        DEV: ({"error_envelope_200": True}, "failed", "answered 200 with an error"),
        PRO: (
            {"html_rate": 0.3, "truncated_json_rate": 0.3, "html_statuses": [200, 502]},
            "success",
            "",
        ),
    },
}
LABELS = {
    "a": {SCHNELL: "html", DEV: "truncated_json", PRO: "missing_status"},
    "b": {SCHNELL: "unknown_status", DEV: "error_envelope_200", PRO: "mixed_30pct"},
}
#: Ten bad answers in a row end the wait; a couple more requests at most (the first poll, retries of 502s).
MAX_POLLS_BAD = 14


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_bad_answers_fail_clearly_or_retry_boundedly(
    basic_deployment: AirflowDeployment, request: pytest.FixtureRequest, batch: str
) -> None:
    dep = basic_deployment
    t0 = time.monotonic()
    triggerers = {name: dep.components[name].pid for name in live_triggerers(dep)}
    assert len(triggerers) == (2 if AIRFLOW33 else 1)
    per_model = {model: {**faults, "durations": 8} for model, (faults, _, _) in BATCHES[batch].items()}
    sim = fresh_simulator(dep, durations=40, per_model=per_model)  # control (kontext) runs 40 s, healthy
    run_id = start_run(dep, DAG_ID)
    run = dep.wait_for_run(DAG_ID, run_id, timeout=300)
    requests = sim.requests()
    made = {c["model"]: c["prediction_id"] for c in creates(requests)}
    polls = polls_per_prediction(requests)
    states = {ti["task_id"]: ti["state"] for ti in dep.api.task_instances(DAG_ID, run_id)}

    outcomes = {}
    for model, (_faults, expected, text) in BATCHES[batch].items():
        task_id = TASK_OF[model]
        assert states[task_id] == expected, (task_id, states, dep.run_report(DAG_ID, run_id)[:4000])
        if expected == "failed":
            exc_type, message = task_error(dep, DAG_ID, run_id, task_id)
            assert exc_type == "PredictionFailedError", (exc_type, message)
            assert "answers in a row made no sense" in message and text in message, message
            assert polls[made[model]] <= MAX_POLLS_BAD, (task_id, polls[made[model]])
        outcomes[LABELS[batch][model]] = f"{states[task_id]}/{polls[made[model]]}polls"
    # The healthy trigger next to them was never disturbed, and no triggerer crashed or restarted.
    assert states["control"] == "success"
    assert polls[made[KONTEXT]] >= 10  # polled all along its 40 s
    assert {name: dep.components[name].pid for name in live_triggerers(dep)} == triggerers
    dep.check_alive()
    for task_id in TASK_OF.values():  # no unexpected exception in any trigger ("Waiting for ... failed")
        for job in set(_trigger_jobs(dep, run_id, task_id)):
            assert "Waiting for prediction" not in trigger_log(dep, DAG_ID, run_id, task_id, job)
    assert cancels(requests) == []
    assert len(made) == 4
    report(
        request,
        f"7{batch}",
        airflow=".".join(map(str, VERSION)),
        outcome=" ".join(f"{k}={v}" for k, v in outcomes.items()) + f" control={states['control']}",
        creates=len(made),
        asked=4,
        triggerers_restarted=0,
        seconds=round(time.monotonic() - t0, 1),
        run=run["state"],
    )


def _trigger_jobs(dep: AirflowDeployment, run_id: str, task_id: str) -> list[int]:
    folder = dep.task_log_dir(DAG_ID, run_id, task_id)
    return [int(p.name.rsplit(".", 2)[-2]) for p in folder.glob("attempt=1.log.trigger.*.log")]


def test_key_revoked_mid_run(basic_deployment: AirflowDeployment, request: pytest.FixtureRequest) -> None:
    dep = basic_deployment
    t0 = time.monotonic()
    sim = fresh_simulator(dep, durations=120)
    run_id = start_run(dep, "rel_single", conf={"model": DEV, "prompt": "scenario 7: revoked key"})
    running_trigger(dep, "rel_single", run_id, "generate")
    prediction_id = creates(sim.requests())[0]["prediction_id"]

    comp = dep.components["simulator"]
    original = list(comp.argv)
    at = comp.argv.index("--api-key") + 1
    revoked = time.monotonic()
    try:
        comp.argv[at] = "sk-the-new-key-after-revocation"
        _restart_simulator(dep)
        run = dep.wait_for_run("rel_single", run_id, timeout=120)
        fail_seconds = time.monotonic() - revoked
        after = sim.requests()
    finally:
        comp.argv[:] = original
        _restart_simulator(dep)
    assert run["state"] == "failed"
    exc_type, message = task_error(dep, "rel_single", run_id, "generate")
    assert exc_type == "PredictionFailedError", (exc_type, message)
    assert (
        "3 status checks in a row failed" in message
        and "Check the CometAPI key in connection 'cometapi_default'" in message
    ), message
    assert dep.config.api_key not in message
    statuses = [r["status"] for r in after if r["endpoint"] == "status"]
    assert statuses == [401, 401, 401], statuses  # bounded: three, then stop
    assert cancels(after) == []
    report(
        request,
        "7c",
        airflow=".".join(map(str, VERSION)),
        outcome=f"key revoked mid-run: task failed after {len(statuses)} x 401 naming the connection; prediction not cancelled (cannot be)",
        creates=1,
        asked=1,
        seconds_revoke_to_failed=round(fail_seconds, 1),
        seconds=round(time.monotonic() - t0, 1),
        prediction=prediction_id,
    )


def _restart_simulator(dep: AirflowDeployment) -> None:
    """Restart the simulator process (same port); its predictions and log start empty."""
    dep.restart_component("simulator", grace=5)

    def answers() -> bool:
        try:
            dep.simulator.faults()
        except Exception:  # noqa: BLE001 - starting
            return False
        return True

    wait(dep, answers, 30, "the simulator to answer again")
