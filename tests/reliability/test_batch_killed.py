"""Scenario: one PredictionBatchOperator runs 200 prompts (6 refused) into a folder; its worker is killed while
it creates, then the triggerer holding its trigger is killed while it waits.

``rel_batch``'s operator pauses its first try once it has created (and recorded in the task state store) at
least 40 items, as the batch refills after its first deferral; the test SIGKILLs that task process (no
``on_kill``, no cleanup: a lost worker). Airflow retries the task. Once the retry has deferred and a triggerer
runs its trigger, that triggerer is SIGKILLed (process group included); the other one takes the trigger over.

Promise (Airflow 3.3): exactly one create per item (the retry resumes or takes over every prediction of the
first try, the refused ones included), every item's row in the XCom and in ``manifest.jsonl`` ends right
(succeeded with its file on disk and its sha256, or failed with the API's error), the run succeeds
(``max_failures`` allows the refused prompts). A new triggerer is started afterwards so the scenarios that
follow have two again.

12b: the same batch with ``deferrable=False`` (``rel_batch_worker``) waits in its worker's own event loop; its
first try is SIGKILLed once it has refilled past 80 items. Same promise, and the retry took over every
prediction of the first try.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.deployment import AirflowDeployment
from tests.reliability.common import AIRFLOW33, needs_33, report
from tests.reliability.helpers import (
    add_mapped_triggerer,
    cancels,
    component_of_job,
    creates,
    fresh_simulator,
    kill_pid,
    live_triggerers,
    poll_figures,
    start_run,
    trigger_log,
    trigger_moved,
    wait,
)

SKIP_REASON = needs_33(
    "the retry resumes the first try's predictions from the task state store, and two triggerers need the "
    "PostgreSQL deployment (3.3 only here)"
)
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not AIRFLOW33, reason=SKIP_REASON)]

DAG_ID = "rel_batch"
TASK_ID = "batch"
PROMPTS = 200
#: As rel_batch.REFUSED (the DAG file is not importable from here: its folder is the DAGs folder).
REFUSED = (5, 19, 36, 77, 150, 199)
#: The first try pauses (and is killed) once it has created at least this many items.
PAUSE_AFTER = 40
#: The first try waiting in its worker (12b) is killed once it has refilled past this many items.
PAUSE_AFTER_IN_WORKER = 80
#: What the retry logs for each item it takes over from the first try (batch_work._resume).
RESUMED = re.compile(r"resuming prediction (\w+) \(\w+\) of an earlier try")


def prompt(index: int) -> str:
    return f"{'A forbidden' if index in REFUSED else 'A'} picture number {index}"


def test_batch_survives_a_killed_worker_and_a_killed_triggerer(
    rel_deployment: AirflowDeployment, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    dep = rel_deployment
    t0 = time.monotonic()
    sim, output, pid_file, run_id = start_batch(dep, DAG_ID, tmp_path, PAUSE_AFTER)

    # 1. The worker dies while the batch creates (its ids are in the task state store, nowhere else).
    pid, created_by_first_try = wait(
        dep, lambda: paused(pid_file), 240, f"the batch's first try to create {PAUSE_AFTER} items"
    )
    kill_pid(pid)
    worker_killed = time.monotonic()
    first_try_ids = {c["prediction_id"] for c in creates(sim.requests())}
    assert len(first_try_ids) == created_by_first_try >= PAUSE_AFTER, (len(first_try_ids), created_by_first_try)

    # 2. The retry defers; the triggerer running its trigger dies while it waits.
    def retry_deferred_and_polled() -> tuple[int, int] | None:
        ti = dep.api.task_instance(DAG_ID, run_id, TASK_ID)
        trigger = ti.get("trigger") or {}
        job = trigger.get("triggerer_id")
        if ti.get("state") != "deferred" or ti["try_number"] < 2 or not job:
            return None
        log = trigger_log(dep, DAG_ID, run_id, TASK_ID, job, ti["try_number"])
        return (job, ti["try_number"]) if f"(ID {trigger['id']}) starting" in log else None

    dead_job, retry_try = wait(dep, retry_deferred_and_polled, 240, "the retry to defer and a triggerer to run it")
    retry_seconds = time.monotonic() - worker_killed
    victim = component_of_job(dep, dead_job)
    triggerer_killed = time.monotonic()
    dep.stop_component(victim.name, sig=signal.SIGKILL)
    assert not victim.alive
    new_job = trigger_moved(
        dep, DAG_ID, run_id, TASK_ID, away_from=dead_job, what="another triggerer to take the batch's trigger over"
    )
    takeover_seconds = time.monotonic() - triggerer_killed

    run = dep.wait_for_run(DAG_ID, run_id, timeout=600)
    seconds = time.monotonic() - t0
    requests = sim.requests()
    ti = dep.api.task_instance(DAG_ID, run_id, TASK_ID)
    assert run["state"] == "success", dep.run_report(DAG_ID, run_id)
    check_every_item(dep, sim, DAG_ID, run_id, output)

    # The retry took over every prediction of the first try (running, succeeded or refused) instead of creating.
    resumed = resumed_by(dep, DAG_ID, run_id, retry_try)
    assert resumed == first_try_ids, sorted(first_try_ids - resumed)
    assert "resuming the task" in trigger_log(dep, DAG_ID, run_id, TASK_ID, new_job, ti["try_number"])

    # Back to two triggerers for the scenarios that follow.
    name, job = add_mapped_triggerer(dep)
    assert len(live_triggerers(dep)) == 2, live_triggerers(dep)
    report(
        request,
        "12 batch",
        outcome=f"run {run['state']}, task on try {ti['try_number']}, trigger moved job {dead_job} -> {new_job}",
        creates=len(creates(requests)),
        items=PROMPTS,
        refused=len(REFUSED),
        created_by_first_try=created_by_first_try,
        resumed_by_retry=len(resumed),
        tries=ti["try_number"],
        seconds_kill_to_retry_deferred=round(retry_seconds, 1),
        seconds_to_takeover=round(takeover_seconds, 1),
        seconds=round(seconds, 1),
        replacement=f"{name}(job {job})",
        **poll_figures(requests, [p["id"] for p in sim.predictions()]),
    )


def test_batch_waiting_in_its_worker_survives_a_killed_worker(
    rel_deployment: AirflowDeployment, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """12b: the same batch with ``deferrable=False`` (it waits in its worker's own event loop, refilling at every
    end); its first try is SIGKILLed after rounds of waiting and refilling, the retry takes every item over."""
    dep, dag_id = rel_deployment, "rel_batch_worker"
    t0 = time.monotonic()
    sim, output, pid_file, run_id = start_batch(dep, dag_id, tmp_path, PAUSE_AFTER_IN_WORKER)

    pid, created_by_first_try = wait(dep, lambda: paused(pid_file), 300, "the batch's first try to refill enough")
    # It got there by waiting in its worker: predictions ended and their files were written before the kill.
    files_before_kill = len(list(output.rglob("*.webp")))
    assert files_before_kill > 0
    kill_pid(pid)
    first_try_ids = {c["prediction_id"] for c in creates(sim.requests())}
    assert len(first_try_ids) == created_by_first_try >= PAUSE_AFTER_IN_WORKER

    run = dep.wait_for_run(dag_id, run_id, timeout=600)
    seconds = time.monotonic() - t0
    ti = dep.api.task_instance(dag_id, run_id, TASK_ID)
    assert run["state"] == "success", dep.run_report(dag_id, run_id)
    assert ti["try_number"] == 2
    check_every_item(dep, sim, dag_id, run_id, output)
    resumed = resumed_by(dep, dag_id, run_id, 2)
    assert resumed == first_try_ids, sorted(first_try_ids - resumed)
    report(
        request,
        "12b batch in its worker",
        outcome=f"run {run['state']}, task on try {ti['try_number']}",
        creates=len(creates(sim.requests())),
        items=PROMPTS,
        refused=len(REFUSED),
        created_by_first_try=created_by_first_try,
        files_before_kill=files_before_kill,
        resumed_by_retry=len(resumed),
        seconds=round(seconds, 1),
    )


def start_batch(dep: AirflowDeployment, dag_id: str, tmp_path: Path, pause_after: int):
    """A fresh simulator (2-8 s predictions, "forbidden" refused) and a run of ``dag_id`` whose first try
    pauses after ``pause_after`` items: ``(simulator, output folder, pid file, run id)``."""
    sim = fresh_simulator(dep, durations=[2.0, 8.0], refused_words=["forbidden"])
    output = tmp_path / "out"
    pid_file = Path(dep.home) / f"batch-{uuid.uuid4().hex[:8]}.pid"
    conf = {"destination": output.as_uri(), "pid_file": str(pid_file), "pause_after": pause_after}
    return sim, output, pid_file, start_run(dep, dag_id, conf=conf, parse_timeout=120)


def paused(pid_file: Path) -> tuple[int, int] | None:
    """``(pid, items created)`` once the first try has paused (see rel_batch.PausingBatch)."""
    try:
        pid, created = pid_file.read_text().split()
    except (OSError, ValueError):
        return None
    return int(pid), int(created)


def resumed_by(dep: AirflowDeployment, dag_id: str, run_id: str, try_number: int) -> set[str]:
    """The ids of the earlier try's predictions that try ``try_number`` took over (its log says so)."""
    log = "\n".join(
        p.read_text(errors="replace")
        for p in dep.task_log_files(dag_id, run_id, TASK_ID)
        if p.name == f"attempt={try_number}.log"
    )
    return set(RESUMED.findall(log))


def check_every_item(dep: AirflowDeployment, sim, dag_id: str, run_id: str, output: Path) -> None:
    """Exactly one create per item, nothing cancelled, and every item's row right in the XCom and the manifest
    (succeeded with its file on disk and its sha256, or failed with the API's error)."""
    requests, predictions = sim.requests(), sim.predictions()
    per_prompt = Counter(p["input"]["prompt"] for p in predictions)
    assert per_prompt == Counter(prompt(i) for i in range(PROMPTS)), {k: n for k, n in per_prompt.items() if n != 1}
    assert len(creates(requests)) == PROMPTS
    assert cancels(requests) == []
    by_prompt = {p["input"]["prompt"]: p for p in predictions}
    assert {i for i in range(PROMPTS) if by_prompt[prompt(i)]["status"] != "succeeded"} == set(REFUSED)

    rows = dep.api.xcom(dag_id, run_id, TASK_ID)
    (manifest,) = output.rglob("manifest.jsonl")
    assert [json.loads(line) for line in manifest.read_text().splitlines()] == rows
    assert [row["index"] for row in rows] == list(range(PROMPTS))
    for i, row in enumerate(rows):
        assert row["input"]["prompt"] == prompt(i) and row["prediction_id"] == by_prompt[prompt(i)]["id"], row
        if i in REFUSED:
            assert row["status"] == "failed" and "NSFW" in row["error"] and row["files"] == [], row
            continue
        assert row["status"] == "succeeded", row
        (written,) = row["files"]
        data = Path(written["path"].removeprefix("file://")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == written["sha256"] and len(data) == written["size"], row
    assert len(list(output.rglob("*.webp"))) == PROMPTS - len(REFUSED)
