"""Benchmark: N mapped predictions on a real Airflow deployment, deferrable versus poke-mode sensor.

    .venv/airflow-3.3/bin/python benchmarks/real_airflow.py --n 200      # deferrable, then poke
    .venv/airflow-3.3/bin/python benchmarks/real_airflow.py --n 200 --modes deferrable poke reschedule

One deployment (``tests/e2e/deployment.py``): api-server, scheduler with LocalExecutor (``[core] parallelism``
4), dag-processor and one triggerer on 127.0.0.1, with a throw-away PostgreSQL (``tests/reliability/postgres.py``;
``--db sqlite`` for Airflow's SQLite file instead). The CometAPI simulator runs in this process (the
harness's ``simulator=False``, its connection passed in ``AIRFLOW_CONN_COMETAPI_DEFAULT``), so that each
prediction's run time can be a function of its input: prediction ``i`` runs the same time in every mode.

Each mode runs the same batch, one after the other, through its DAG in ``benchmarks/dags/bench_sensor_modes.py``:
per prediction a create-only ``CreatePredictionOperator`` and a ``PredictionSensor`` on its id
(``deferrable=True``, ``mode="poke"`` or ``mode="reschedule"``; ``poke_interval`` 5 s), in a mapped task group
where each sensor outranks the creates, so that it starts as soon as its own prediction exists. The simulator
is reset before each mode. Prediction run times, as in ``benchmarks/triggers.py``: 70% 2-10 s, 25% 10-60 s,
5% 60-120 s (uniform in each band, drawn once from ``--seed``); ``--spread short`` caps the bands at 30 and 60 s.

The creates run in a pool of ``parallelism - 1`` slots (``--create-pool``; 0: no pool, as docs/reliability.md
limit 7 advises on LocalExecutor): Airflow 3.3.2's scheduler hands the LocalExecutor many more task instances
than ``parallelism`` (39 at N = 48 without the pool; column "peak handed to executor"), and its 4 workers take
them first come, first served, whatever their priority; without the pool every create queues up ahead of the
first sensors, and most predictions are over before their sensor starts.

Figures, per mode:

- run, wall: the DAG run's state and ``end_date - start_date`` (REST API).
- worker slot-s: how long LocalExecutor workers were busy with the run. Every time a worker runs a task
  (a create, a poke-mode sensor for its whole wait, a deferrable sensor's run up to ``defer()`` and its
  resumed run, each reschedule-mode poke), Airflow's task supervisor logs ``Workload finished ...
  duration=<s> final_state=<state> workload_id=<ti id>`` in the scheduler's output; the sum of those
  durations (retried tries included) is the slot-seconds, and ``end - duration`` .. ``end`` are the intervals
  that give the peak number of tasks running at once. The REST API's task-instance ``duration`` cannot give
  this: a deferred task keeps its first ``start_date``, so its ``duration`` includes the time it waited in the
  triggerer (no worker held), and a rescheduled sensor's covers only its last poke. That sum is shown too,
  as "TI duration sum (REST)". "of which sensors": the workloads of the ``wait`` tasks (ids matched through the
  scheduler's ``TaskInstance Finished: ... task_id=... ti_id=...`` lines, which name every try). A worker run
  includes the supervisor's start-up and wind-down: on Airflow 3.3.2 some runs (of any task) keep their worker
  about 5 s after the task process has finished, in every mode.
- peak handed to executor: the most task instances sent to the executor and not yet finished (the
  scheduler's ``Trying to enqueue tasks`` lines minus ``Workload finished`` lines).
- creates / N and status requests per prediction: from the simulator's request log.
- tasks succeeded: task instances in ``success`` out of all (``2 N + 1``); retried: ``try_number > 1``. Airflow
  3.3.2 fails a try when the executor's late report of the task's previous run (deferred, or up for
  reschedule) arrives after the task is queued again ("task state changed externally"); the DAG's retries
  absorb most of those, but in reschedule mode with a 5 s ``poke_interval`` a sensor can use up all four tries.
- scheduler: stalls (``Heartbeat recovered after``) and reset tasks (``Reset the following N orphaned``) in
  the scheduler's log during the run (docs/reliability.md, limit 7).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from airflow_comet.testing.faults import Faults  # noqa: E402
from airflow_comet.testing.simulator import CometAPISimulator  # noqa: E402
from benchmarks.triggers import WORKLOAD, _models, machine  # noqa: E402
from tests.e2e.deployment import API_KEY, AirflowDeployment, DeploymentConfig, SimulatorClient  # noqa: E402
from tests.reliability import postgres  # noqa: E402
from tests.reliability.helpers import creates, polls_per_prediction, start_run, task_instances  # noqa: E402

DAGS = REPO / "benchmarks" / "dags"
POOL = "cometapi_creates"
SPREADS = {
    "realistic": {model: span for model, _, span in WORKLOAD},
    "short": dict(zip((m for m, _, _ in WORKLOAD), ((2.0, 10.0), (10.0, 30.0), (30.0, 60.0)))),
}
_WORKLOAD_LINE = re.compile(r"^(\S+) \[info\s*\] Workload finished (.*)$", re.MULTILINE)
_ENQUEUED = re.compile(r"^(\S+) \[info\s*\] Trying to enqueue tasks: \[(.*?)\] for executor", re.MULTILINE | re.DOTALL)
_FINISHED = re.compile(r"TaskInstance Finished: dag_id=([^,]+), task_id=([^,]+), run_id=.*?, ti_id=([0-9a-f-]+)")


def batch(n: int, seed: int, spans: dict[str, tuple[float, float]]) -> tuple[list[dict[str, Any]], list[float]]:
    """The predictions the DAG maps over (the run's conf; models in the WORKLOAD shares, in a seeded order),
    and the run time of each (prediction ``i`` carries ``input["seed"] = i``)."""
    models = _models(n, seed)
    rng = random.Random(seed)
    durations = [rng.uniform(*spans[model]) for model in models]
    predictions = [
        {"model": model, "input": {"prompt": f"benchmark {i}", "seed": i, "output_format": "webp"}}
        for i, model in enumerate(models)
    ]
    return predictions, durations


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


def run_mode(
    dep: AirflowDeployment, sim: SimulatorClient, mode: str, predictions: list[dict[str, Any]], timeout: float
) -> dict[str, Any]:
    dag_id = f"bench_sensor_{mode}"
    sim.reset()  # forget the previous mode's predictions and requests
    scheduler_log = dep.components["scheduler-0"].log_path
    offset = scheduler_log.stat().st_size
    t0 = time.monotonic()
    run_id = start_run(dep, dag_id, conf={"predictions": predictions})
    run = dep.wait_for_run(dag_id, run_id, timeout=timeout)
    observed = time.monotonic() - t0
    n = len(predictions)
    tis = task_instances(dep, dag_id, run_id)

    def settled() -> bool:
        # The supervisor logs "Workload finished" once the task process has gone, which can be seconds after
        # the task reported its state (and so after the run ended): wait for every task's last line.
        logged = {(w["id"], w["state"]) for w in workloads(scheduler_log, offset)[0]}
        ids = {tid for tid, _ in logged}
        return all(
            (ti["id"], "success") in logged if ti["state"] == "success" else ti["id"] in ids
            for ti in tis
            if ti.get("start_date")
        )

    try:
        dep.wait_until(settled, time.monotonic() + 60, "every task's last 'Workload finished' line", interval=1)
    except AssertionError:
        print(f"{mode}: some 'Workload finished' lines are missing; counting those logged", file=sys.stderr)
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
    states = Counter(ti["state"] for ti in tis)
    return {
        "mode": mode,
        "n": n,
        "run_state": run["state"],
        "wall_s": _ts(run["end_date"]) - _ts(run["start_date"]),
        "observed_s": observed,
        "slot_s": sum(w["duration"] for w in done),
        "slot_s_sensors": sum(w["duration"] for w in done if task_of.get(w["id"], "").endswith(".wait")),
        "rest_duration_s": sum(ti.get("duration") or 0.0 for ti in tis),
        "peak_running": peak_concurrency([(w["end"] - w["duration"], w["end"]) for w in done]),
        "peak_backlog": peak_backlog(log_text, done),
        "worker_runs": len(done),
        "worker_run_states": dict(Counter(w["state"] for w in done)),
        "creates": len(made),
        "status_requests": sum(polls.values()),
        "status_per_prediction_max": max(per_prediction),
        "tis": len(tis),
        "ti_states": dict(states),
        "retried": sum(1 for ti in tis if (ti.get("try_number") or 0) > 1),
        "scheduler_stalls": [float(x) for x in re.findall(r"Heartbeat recovered after ([0-9.]+) seconds", log_text)],
        "scheduler_resets": sum(int(x) for x in re.findall(r"Reset the following (\d+) orphaned", log_text)),
    }


def table(results: list[dict[str, Any]]) -> str:
    head = ("mode", "N", "run", "wall s", "worker slot-s", "of which sensors", "slot-s / prediction",
            "TI duration sum (REST) s", "peak running", "peak handed to executor", "worker runs", "creates / N",
            "status req / pred (max)", "tasks succeeded", "retried", "scheduler stalls / resets")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        runs = ", ".join(f"{k} {v}" for k, v in sorted(r["worker_run_states"].items()))
        stalls = r["scheduler_stalls"]
        cells = (
            r["mode"], r["n"], r["run_state"], f"{r['wall_s']:.0f}", f"{r['slot_s']:.0f}", f"{r['slot_s_sensors']:.0f}",
            f"{r['slot_s'] / r['n']:.1f}", f"{r['rest_duration_s']:.0f}", r["peak_running"], r["peak_backlog"],
            f"{r['worker_runs']} ({runs})", f"{r['creates']} / {r['n']}",
            f"{r['status_requests'] / r['n']:.2f} ({r['status_per_prediction_max']})",
            f"{r['ti_states'].get('success', 0)} / {r['tis']}", r["retried"],
            f"{len(stalls)} (max {max(stalls, default=0):.0f} s) / {r['scheduler_resets']}",
        )
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def describe(args: argparse.Namespace, durations: list[float], db: str, settings: dict, load: tuple) -> str:
    """The machine and the exact settings, printed above the table."""
    spans = SPREADS[args.spread]
    bands = ", ".join(f"{share:.0%} {spans[m][0]:g}-{spans[m][1]:g} s" for m, share, _ in WORKLOAD)
    sched = settings["scheduler"]
    return "\n".join([
        f"Machine: nproc {len(os.sched_getaffinity(0))}; {machine()}; load average before start "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)",
        f"Deployment (tests/e2e/deployment.py): LocalExecutor, [core] parallelism {args.parallelism}, "
        "max_active_tasks_per_dag and DAG max_active_tasks 100000; creates in "
        + (f"pool {POOL} ({args.create_pool} slots, deferred not counted)" if args.create_pool else "default_pool")
        + ", sensors in default_pool (128 slots); "
        f"1 scheduler (scheduler_heartbeat_sec {sched['scheduler_heartbeat_sec']}, scheduler_idle_sleep_time "
        f"{sched['scheduler_idle_sleep_time']}), 1 triggerer, dag-processor, api-server; metadata DB {db}; "
        "CometAPI simulator in the benchmark process, connection extra read_timeout 15, connect_timeout 5 "
        "(retries: the provider's defaults).",
        f"Workload: N = {args.n} mapped predictions per mode, {args.spread} spread ({bands}"
        f"{'; SHORTENED, not the realistic one' if args.spread == 'short' else ''}); seed {args.seed}: "
        f"prediction i runs the same time in every mode, {sum(durations):.0f} s in all, longest "
        f"{max(durations):.0f} s. DAG benchmarks/dags/bench_sensor_modes.py: mapped task group create "
        f"(create-only) -> PredictionSensor(poke_interval={args.poke_interval:g}, timeout=3600), weight_rule "
        "upstream (a sensor before the next create), retries 3 (5 s); modes "
        f"{', '.join(args.modes)}, one after the other in the same deployment.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="mapped predictions per mode (default 200)")
    parser.add_argument("--modes", nargs="+", choices=["deferrable", "poke", "reschedule"],
                        default=["deferrable", "poke"], help="sensor modes, in this order (default: deferrable poke)")
    parser.add_argument("--parallelism", type=int, default=4, help="[core] parallelism (default 4)")
    parser.add_argument("--create-pool", type=int, help="slots of the creates' pool (default parallelism - 1; 0: none)")
    parser.add_argument("--poke-interval", type=float, default=5.0, help="every sensor's poke_interval (default 5)")
    parser.add_argument("--spread", choices=sorted(SPREADS), default="realistic",
                        help="prediction run times: realistic (2-10/10-60/60-120 s) or short (2-10/10-30/30-60 s)")
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--run-timeout", type=float, default=7200.0, help="seconds allowed per DAG run")
    parser.add_argument("--home", type=Path, help="AIRFLOW_HOME to create (default: a new temporary directory)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    if args.create_pool is None:
        args.create_pool = max(1, args.parallelism - 1)
    predictions, durations = batch(args.n, args.seed, SPREADS[args.spread])

    def duration(model: str, inputs: dict[str, Any]) -> float:
        return durations[inputs["seed"]]

    t_start = time.monotonic()
    load = os.getloadavg()
    pg = postgres.PostgresCluster() if args.db == "postgres" else None
    try:
        if pg is not None:
            pg.start()
        with CometAPISimulator(API_KEY, faults=Faults(durations=duration), seed=args.seed) as simulator:
            sim = SimulatorClient(simulator.base_url, API_KEY)
            config = DeploymentConfig(
                parallelism=args.parallelism,
                database_url=pg.url if pg else None,
                dags_folder=DAGS,
                simulator=False,
                airflow_config={"core": {"max_active_tasks_per_dag": 100_000}},
                extra_env={
                    # Everything is on 127.0.0.1: short timeouts; retries are the provider's defaults.
                    "AIRFLOW_CONN_COMETAPI_DEFAULT": json.dumps(sim.connection(read_timeout=15, connect_timeout=5)),
                    "COMET_BENCH_POKE_INTERVAL": str(args.poke_interval),
                    "COMET_BENCH_CREATE_POOL": POOL if args.create_pool else "default_pool",
                },
                start_timeout=300.0,
                migrate_timeout=240.0,
            )
            with AirflowDeployment(config, base_dir=args.home) as dep:
                ready = time.monotonic() - t_start
                print(f"deployment ready in {ready:.0f} s; AIRFLOW_HOME={dep.home}", file=sys.stderr, flush=True)
                if args.create_pool:
                    pool = {"name": POOL, "slots": args.create_pool, "include_deferred": False}
                    dep.api.request("POST", "pools", json=pool, expect=(200, 201))
                results = []
                for mode in args.modes:
                    results.append(run_mode(dep, sim, mode, predictions, args.run_timeout))
                    print(f"{mode}: run {results[-1]['run_state']} in {results[-1]['observed_s']:.0f} s",
                          file=sys.stderr, flush=True)
                settings = dep.airflow_settings()
    finally:
        if pg is not None:
            pg.stop()

    db = f"PostgreSQL {pg.bin_dir.parent.name} (tests/reliability/postgres.py)" if pg else "SQLite"
    print(describe(args, durations, db, settings, load))
    print()
    print(table(results))
    print()
    runs = ", ".join(f"{r['mode']} run {r['observed_s']:.0f} s" for r in results)
    print(f"Total time: {time.monotonic() - t_start:.0f} s (deployment start-up {ready:.0f} s; {runs}).")
    if args.json:
        figures = {"args": {k: str(v) for k, v in vars(args).items()}, "durations": durations, "results": results}
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
