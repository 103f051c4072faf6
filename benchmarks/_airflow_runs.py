"""Measuring one DAG run of a real deployment (``tests/e2e/deployment.py``), for ``benchmarks/real_airflow.py``.

Worker slot-seconds come from the task supervisor's ``Workload finished ... duration=<s> final_state=<state>
workload_id=<ti id>`` lines in the scheduler's output (one per worker run of a task: a create, a deferrable
task's run up to ``defer()`` and each resumed run, a poke-mode sensor for its whole wait); the REST API's
``duration`` cannot give them, as a deferred task keeps its first ``start_date``. See real_airflow.py's
docstring for every figure.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.e2e.deployment import AirflowDeployment, SimulatorClient
from tests.reliability.helpers import creates, polls_per_prediction, start_run, task_instances

_WORKLOAD_LINE = re.compile(r"^(\S+) \[info\s*\] Workload finished (.*)$", re.MULTILINE)
_ENQUEUED = re.compile(r"^(\S+) \[info\s*\] Trying to enqueue tasks: \[(.*?)\] for executor", re.MULTILINE | re.DOTALL)
_FINISHED = re.compile(r"TaskInstance Finished: dag_id=([^,]+), task_id=([^,]+), run_id=.*?, ti_id=([0-9a-f-]+)")


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def workloads(scheduler_log: Path, offset: int) -> tuple[list[dict[str, Any]], str]:
    """The supervisor's ``Workload finished`` lines written after ``offset`` (end time, duration, state, id),
    and the log text itself."""
    with open(scheduler_log, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    out = []
    for stamp, rest in _WORKLOAD_LINE.findall(text):
        fields = dict(re.findall(r"(\w+)=(\S+)", rest))
        out.append({"end": _ts(stamp), "duration": float(fields["duration"]),
                    "state": fields.get("final_state"), "id": fields.get("workload_id")})
    return out, text


def peak_backlog(log_text: str, done: list[dict[str, Any]]) -> int:
    """The most task instances handed to the executor and not finished yet."""
    steps = [(_ts(stamp), text.count("<TaskInstance:")) for stamp, text in _ENQUEUED.findall(log_text)]
    steps += [(w["end"], -1) for w in done]
    peak = current = 0
    for _, step in sorted(steps):
        current += step
        peak = max(peak, current)
    return peak


def peak_concurrency(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, step in events:  # at equal times an end (-1) sorts first
        current += step
        peak = max(peak, current)
    return peak


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every process in group ``pgid`` so far, with their waited-for children's.

    Airflow 3's triggerer runs its triggers in a child process of ``airflow triggerer``; the harness starts
    each component in a session of its own, so its process group holds both."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:  # gone
            continue
        if int(fields[2]) == pgid:
            total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / tick


def measure_run(
    dep: AirflowDeployment,
    sim: SimulatorClient,
    dag_id: str,
    conf: dict[str, Any],
    n: int,
    timeout: float,
    wait_suffixes: tuple[str, ...] = (".wait",),
    ended_by_trigger: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run ``dag_id`` once with ``conf`` (the simulator reset first) and measure it; ``n`` predictions.

    ``wait_suffixes``: the task ids (their endings) whose worker runs are reported apart as ``slot_s_waits``
    and ``worker_runs_waits``. ``ended_by_trigger``: those of tasks whose trigger ends them
    (``end_from_trigger``), so that their last worker run ends ``deferred``."""
    sim.reset()  # forget the previous run's predictions and requests
    scheduler_log = dep.components["scheduler-0"].log_path
    triggerer_pid = dep.components["triggerer-0"].pid
    offset = scheduler_log.stat().st_size
    cpu_before = group_cpu_seconds(triggerer_pid)
    t0 = time.monotonic()
    run_id = start_run(dep, dag_id, conf=conf)
    run = dep.wait_for_run(dag_id, run_id, timeout=timeout)
    observed = time.monotonic() - t0
    triggerer_cpu = group_cpu_seconds(triggerer_pid) - cpu_before
    tis = task_instances(dep, dag_id, run_id)

    def settled() -> bool:
        # The supervisor logs "Workload finished" once the task process has gone, which can be seconds after
        # the task reported its state (and so after the run ended): wait for every task's last line.
        logged = {(w["id"], w["state"]) for w in workloads(scheduler_log, offset)[0]}
        ids = {tid for tid, _ in logged}
        def last_logged(ti: dict[str, Any]) -> bool:
            if ti["state"] != "success":
                return ti["id"] in ids
            if ti["task_id"].endswith(ended_by_trigger) and ended_by_trigger:
                return (ti["id"], "deferred") in logged or (ti["id"], "success") in logged
            return (ti["id"], "success") in logged

        return all(last_logged(ti) for ti in tis if ti.get("start_date"))

    try:
        dep.wait_until(settled, time.monotonic() + 60, "every task's last 'Workload finished' line", interval=1)
    except AssertionError:
        print(f"{dag_id}: some 'Workload finished' lines are missing; counting those logged", file=sys.stderr)
    done, log_text = workloads(scheduler_log, offset)
    requests = sim.requests()
    made = creates(requests)
    polls = polls_per_prediction(requests)
    per_prediction = [polls.get(c["prediction_id"], 0) for c in made] or [0]
    # Task of each workload id: a retry gets a new id, which the REST API no longer shows; the scheduler
    # logs every try's "TaskInstance Finished: dag_id=..., task_id=..., ..., ti_id=...".
    task_of = {tid: task for dag, task, tid in _FINISHED.findall(log_text) if dag == dag_id}
    task_of |= {ti["id"]: ti["task_id"] for ti in tis}
    done = [w for w in done if w["id"] in task_of]  # this run's only
    waits = [w for w in done if task_of.get(w["id"], "").endswith(wait_suffixes)]
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "n": n,
        "run_state": run["state"],
        "wall_s": _ts(run["end_date"]) - _ts(run["start_date"]),
        "observed_s": observed,
        "slot_s": sum(w["duration"] for w in done),
        "slot_s_waits": sum(w["duration"] for w in waits),
        "worker_runs_waits": len(waits),
        "rest_duration_s": sum(ti.get("duration") or 0.0 for ti in tis),
        "peak_running": peak_concurrency([(w["end"] - w["duration"], w["end"]) for w in done]),
        "peak_backlog": peak_backlog(log_text, done),
        "worker_runs": len(done),
        "worker_run_states": dict(Counter(w["state"] for w in done)),
        "creates": len(made),
        "create_requests": sum(1 for r in requests if r["endpoint"] == "create"),
        "status_requests": sum(polls.values()),
        "status_per_prediction_max": max(per_prediction),
        "tis": len(tis),
        "ti_states": dict(Counter(ti["state"] for ti in tis)),
        "retried": sum(1 for ti in tis if (ti.get("try_number") or 0) > 1),
        "triggerer_cpu_s": triggerer_cpu,
        "scheduler_stalls": [float(x) for x in re.findall(r"Heartbeat recovered after ([0-9.]+) seconds", log_text)],
        "scheduler_resets": sum(int(x) for x in re.findall(r"Reset the following (\d+) orphaned", log_text)),
    }
