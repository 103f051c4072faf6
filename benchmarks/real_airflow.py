"""Benchmark: a batch of predictions on a real Airflow deployment, in several shapes side by side.

    .venv/airflow-3.3/bin/python benchmarks/real_airflow.py --n 1000                    # the nightly run, 4 shapes
    .venv/airflow-3.3/bin/python benchmarks/real_airflow.py --n 1000 --shapes mapped:200 end_from_trigger:200 \
        batch:200 asyncio:200 batch asyncio                                              # (a), (b) at N = 200 only
    .venv/airflow-3.3/bin/python benchmarks/real_airflow.py --n 200 --modes deferrable poke  # the sensor modes

One deployment (``tests/e2e/deployment.py``): api-server, scheduler with LocalExecutor (``[core] parallelism``
4), dag-processor and one triggerer on 127.0.0.1, with a throw-away PostgreSQL (``tests/reliability/postgres.py``;
``--db sqlite`` for Airflow's SQLite file instead). The CometAPI simulator runs in this process (the
harness's ``simulator=False``, its connection passed in ``AIRFLOW_CONN_COMETAPI_DEFAULT``, with the extra
``max_requests_per_second`` of ``--max-rps``, default 20), so that each prediction's run time can be a
function of its input: prediction ``i`` runs the same time in every shape. The simulator is reset before each
run. Prediction run times, as in ``benchmarks/triggers.py``: 70% 2-10 s, 25% 10-60 s, 5% 60-120 s (uniform in
each band, drawn once per N from ``--seed``); ``--spread short`` caps the bands at 30 and 60 s.

**The nightly run** (``--shapes``, ``benchmarks/_nightly.py``): the same batch of one model's predictions,
``--fail-share`` (5 %) of them refused by the simulator (chosen prompts, the same in every shape), every output
file saved into a folder of the shape's own, in four shapes one after the other: (a) ``mapped``: the example
pipeline's mapped create -> deferrable sensor -> persist; (b) ``end_from_trigger``: mapped
``CreatePredictionOperator(wait_for_completion=True, deferrable=True, end_from_trigger=True)`` -> persist; (c)
``batch``: one ``PredictionBatchOperator`` (``max_in_flight`` 64); the DAGs are in
``benchmarks/dags/bench_nightly.py``; (d) ``asyncio``: ``benchmarks/floor_asyncio.py``, plain asyncio without
Airflow (64 in flight, creates at ``--max-rps`` a second, each prediction checked every second, each output
downloaded as it ends). A shape may be given as ``shape:N`` to run it at another N than ``--n``. The script
checks the folders, prints the table and the issue's targets (met or not), and draws ``--chart`` (default
docs/images/nightly_run.png).

**The sensor modes** (``--modes``): per prediction a create-only ``CreatePredictionOperator`` and a
``PredictionSensor`` on its id (``deferrable=True``, ``mode="poke"`` or ``mode="reschedule"``;
``poke_interval`` 5 s), in a mapped task group where each sensor outranks the creates, so that it starts as
soon as its own prediction exists (``benchmarks/dags/bench_sensor_modes.py``).

The creates of the mapped shapes run in a pool of ``parallelism - 1`` slots (``--create-pool``; 0: no pool, as
docs/reliability.md limit 7 advises on LocalExecutor): Airflow 3.3.2's scheduler hands the LocalExecutor many
more task instances than ``parallelism`` (39 at N = 48 without the pool; column "peak handed to executor"), and
its 4 workers take them first come, first served, whatever their priority; without the pool every create
queues up ahead of the first sensors, and most predictions are over before their sensor starts.

Figures (``benchmarks/_airflow_runs.py``):

- run, wall: the DAG run's state and ``end_date - start_date`` (REST API); for (d) the script's own time.
- worker slot-s: how long LocalExecutor workers were busy with the run. Every time a worker runs a task
  (a create, a poke-mode sensor for its whole wait, a deferrable task's run up to ``defer()`` and its
  resumed run, each reschedule-mode poke), Airflow's task supervisor logs ``Workload finished ...
  duration=<s> final_state=<state> workload_id=<ti id>`` in the scheduler's output; the sum of those
  durations (retried tries included) is the slot-seconds, and ``end - duration`` .. ``end`` are the intervals
  that give the peak number of tasks running at once. The REST API's task-instance ``duration`` cannot give
  this: a deferred task keeps its first ``start_date``, so its ``duration`` includes the time it waited in the
  triggerer (no worker held), and a rescheduled sensor's covers only its last poke. That sum is shown too,
  as "TI duration sum (REST)". "of which sensors" / "create+wait step": the workloads of those tasks (ids
  matched through the scheduler's ``TaskInstance Finished: ... task_id=... ti_id=...`` lines, which name every
  try). A worker run includes the supervisor's start-up and wind-down: on Airflow 3.3.2 some runs (of any
  task) keep their worker about 5 s after the task process has finished.
- worker runs and task instances per prediction: those ``Workload finished`` lines, and the run's task
  instances (REST), divided by N.
- peak handed to executor: the most task instances sent to the executor and not yet finished (the
  scheduler's ``Trying to enqueue tasks`` lines minus ``Workload finished`` lines).
- creates / N and status requests per prediction: from the simulator's request log ("sent" when some create
  requests made no prediction); peak req/s: the simulator's ``max_requests_per_second()`` (API requests, not
  file downloads, in one wall-clock second).
- triggerer CPU s: user + system CPU of the triggerer's process group (``airflow triggerer`` and its trigger
  runner) from /proc, after the run minus before it; for (d), the floor process's own CPU instead.
- files on disk: the output files in the shape's folder against the outputs of the predictions that
  succeeded (by name, ``<prediction id>-<index>``).
- tasks succeeded: task instances in ``success`` out of all; retried: ``try_number > 1``. Airflow 3.3.2 fails a
  try when the executor's late report of the task's previous run (deferred, or up for reschedule) arrives
  after the task is queued again ("task state changed externally"); the DAGs' retries absorb those.
- scheduler: stalls (``Heartbeat recovered after``) and reset tasks (``Reset the following N orphaned``) in
  the scheduler's log during the run (docs/reliability.md, limit 7).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from airflow_comet.testing.faults import Faults  # noqa: E402
from airflow_comet.testing.simulator import CometAPISimulator  # noqa: E402
from benchmarks import _chart, _nightly  # noqa: E402
from benchmarks._airflow_runs import measure_run  # noqa: E402
from benchmarks.triggers import WORKLOAD, _models, machine  # noqa: E402
from tests.e2e.deployment import API_KEY, AirflowDeployment, DeploymentConfig, SimulatorClient  # noqa: E402
from tests.reliability import postgres  # noqa: E402

DAGS = REPO / "benchmarks" / "dags"
POOL = "cometapi_creates"
SPREADS = {
    "realistic": {model: span for model, _, span in WORKLOAD},
    "short": dict(zip((m for m, _, _ in WORKLOAD), ((2.0, 10.0), (10.0, 30.0), (30.0, 60.0)))),
}
CHART = REPO / "docs" / "images" / "nightly_run.png"
#: Run time of every prediction, by prompt: the simulator's ``durations`` callable reads it.
DURATIONS: dict[str, float] = {}


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


def sensor_table(results: list[dict[str, Any]]) -> str:
    head = ("mode", "N", "run", "wall s", "worker slot-s", "of which sensors", "slot-s / prediction",
            "TI duration sum (REST) s", "peak running", "peak handed to executor", "worker runs", "creates / N",
            "status req / pred (max)", "tasks succeeded", "retried", "scheduler stalls / resets")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        runs = ", ".join(f"{k} {v}" for k, v in sorted(r["worker_run_states"].items()))
        stalls = r["scheduler_stalls"]
        cells = (
            r["mode"], r["n"], r["run_state"], f"{r['wall_s']:.0f}", f"{r['slot_s']:.0f}", f"{r['slot_s_waits']:.0f}",
            f"{r['slot_s'] / r['n']:.1f}", f"{r['rest_duration_s']:.0f}", r["peak_running"], r["peak_backlog"],
            f"{r['worker_runs']} ({runs})", f"{r['creates']} / {r['n']}",
            f"{r['status_requests'] / r['n']:.2f} ({r['status_per_prediction_max']})",
            f"{r['ti_states'].get('success', 0)} / {r['tis']}", r["retried"],
            f"{len(stalls)} (max {max(stalls, default=0):.0f} s) / {r['scheduler_resets']}",
        )
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def describe(args: argparse.Namespace, sizes: dict[int, list[float]], db: str, settings: dict, load: tuple) -> str:
    """The machine and the exact settings, printed above the tables."""
    spans = SPREADS[args.spread]
    bands = ", ".join(f"{share:.0%} {spans[m][0]:g}-{spans[m][1]:g} s" for m, share, _ in WORKLOAD)
    sched = settings["scheduler"]
    runs = "; ".join(f"N = {n:,}: {sum(d):,.0f} s of predictions in all, longest {max(d):.0f} s"
                     for n, d in sorted(sizes.items()))
    lines = [
        f"Machine: nproc {len(os.sched_getaffinity(0))}; {machine()}; load average before start "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min); the provider's code at {_revision()}",
        f"Deployment (tests/e2e/deployment.py): LocalExecutor, [core] parallelism {args.parallelism}, "
        "max_active_tasks_per_dag and DAG max_active_tasks 100000; creates of the mapped shapes in "
        + (f"pool {POOL} ({args.create_pool} slots, deferred not counted)" if args.create_pool else "default_pool")
        + ", other tasks in default_pool (128 slots); "
        f"1 scheduler (scheduler_heartbeat_sec {sched['scheduler_heartbeat_sec']}, scheduler_idle_sleep_time "
        f"{sched['scheduler_idle_sleep_time']}), 1 triggerer, dag-processor, api-server; metadata DB {db}; "
        "CometAPI simulator in the benchmark process, connection extra read_timeout 15, connect_timeout 5, "
        f"max_requests_per_second {args.max_rps:g} (retries: the provider's defaults).",
        f"Workload: {args.spread} spread ({bands}"
        f"{'; SHORTENED, not the realistic one' if args.spread == 'short' else ''}); "
        f"seed {args.seed}: prediction i of a batch of N runs the same time in every shape or mode; {runs}.",
    ]
    if args.modes:
        lines.append(
            f"Sensor modes: N = {args.n}; DAG benchmarks/dags/bench_sensor_modes.py: mapped task group create "
            f"(create-only) -> PredictionSensor(poke_interval={args.poll_interval:g}, timeout=3600), weight_rule "
            f"upstream (a sensor before the next create), retries 3 (5 s); modes {', '.join(args.modes)}."
        )
    if args.shapes:
        lines.append(
            f"Nightly run: model {_nightly.MODEL}, {args.fail_share:.0%} of the prompts refused by the simulator "
            f"(the same prompts in every shape), every output saved to a local folder (file://) of the shape's own; "
            f"longest gap between status checks (poll_interval / poke_interval) {args.poll_interval:g} s; "
            "DAGs benchmarks/dags/bench_nightly.py (mapped shapes: one task group per input, weight_rule upstream, "
            "retries 3), floor benchmarks/floor_asyncio.py; runs, one after the other in the same deployment: "
            + ", ".join(f"{shape} N = {n:,}" for shape, n in args.shapes) + "."
        )
    return "\n".join(lines)


def _shape(text: str) -> tuple[str, int | None]:
    shape, _, size = text.partition(":")
    if shape not in _nightly.SHAPES:
        raise argparse.ArgumentTypeError(f"unknown shape {shape!r}; known: {', '.join(_nightly.SHAPES)}")
    if size and (not size.isdigit() or int(size) < 1):
        raise argparse.ArgumentTypeError(f"{text!r}: the N after ':' must be a whole number >= 1")
    return shape, int(size) if size else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="predictions per run (default 200)")
    parser.add_argument("--shapes", nargs="*", type=_shape, metavar="SHAPE[:N]",
                        help=f"nightly shapes, in this order: {', '.join(_nightly.SHAPES)} (default: all four, "
                             "unless --modes is given)")
    parser.add_argument("--modes", nargs="+", choices=["deferrable", "poke", "reschedule"], default=[],
                        help="sensor modes to compare, run before the shapes (default: none)")
    parser.add_argument("--parallelism", type=int, default=4, help="[core] parallelism (default 4)")
    parser.add_argument("--create-pool", type=int, help="slots of the creates' pool (default parallelism - 1; 0: none)")
    parser.add_argument("--poll-interval", "--poke-interval", type=float, default=5.0,
                        help="every sensor's poke_interval and the nightly shapes' poll_interval (default 5)")
    parser.add_argument("--max-rps", type=float, default=20.0,
                        help="connection extra max_requests_per_second, the floor's creates per second (default 20)")
    parser.add_argument("--fail-share", type=float, default=0.05, help="share of refused prompts (default 0.05)")
    parser.add_argument("--spread", choices=sorted(SPREADS), default="realistic",
                        help="prediction run times: realistic (2-10/10-60/60-120 s) or short (2-10/10-30/30-60 s)")
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--run-timeout", type=float, default=7200.0, help="seconds allowed per run")
    parser.add_argument("--home", type=Path, help="AIRFLOW_HOME to create (default: a new temporary directory)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--chart", type=Path, default=CHART,
                        help=f"the nightly chart (default {CHART.relative_to(REPO)})")
    args = parser.parse_args()
    if args.create_pool is None:
        args.create_pool = max(1, args.parallelism - 1)
    if args.shapes is None:
        args.shapes = [] if args.modes else [(shape, None) for shape in _nightly.SHAPES]
    args.shapes = [(shape, size or args.n) for shape, size in args.shapes]

    # Every batch size: its run times, then (nightly) its inputs. Prompts name their batch, so one table serves all.
    sizes = {n: batch(n, args.seed, SPREADS[args.spread])[1] for n in {args.n} | {n for _, n in args.shapes}}
    sensor_predictions, _ = batch(args.n, args.seed, SPREADS[args.spread])
    DURATIONS.update({p["input"]["prompt"]: sizes[args.n][i] for i, p in enumerate(sensor_predictions)})
    nightly: dict[int, tuple[list[dict[str, Any]], set[int]]] = {}
    for n in {n for _, n in args.shapes}:
        inputs, by_prompt, refused = _nightly.nightly_inputs(n, args.seed, sizes[n], args.fail_share)
        nightly[n] = (inputs, refused)
        DURATIONS.update(by_prompt)

    def duration(model: str, inputs: dict[str, Any]) -> float:
        return DURATIONS[inputs["prompt"]]

    t_start = time.monotonic()
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}", file=sys.stderr, flush=True)
    faults = Faults(durations=duration, refused_words=(_nightly.REFUSED_WORD,))
    pg = postgres.PostgresCluster() if args.db == "postgres" else None
    sensor_results: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    try:
        if pg is not None:
            pg.start()
        with CometAPISimulator(API_KEY, faults=faults, seed=args.seed) as simulator:
            sim = SimulatorClient(simulator.base_url, API_KEY)
            connection = sim.connection(read_timeout=15, connect_timeout=5, max_requests_per_second=args.max_rps)
            config = DeploymentConfig(
                parallelism=args.parallelism,
                database_url=pg.url if pg else None,
                dags_folder=DAGS,
                simulator=False,
                airflow_config={"core": {"max_active_tasks_per_dag": 100_000}},
                extra_env={
                    # Everything is on 127.0.0.1: short timeouts; retries are the provider's defaults.
                    "AIRFLOW_CONN_COMETAPI_DEFAULT": json.dumps(connection),
                    # This checkout's provider, not whichever one the venv has installed (editable or not).
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                    "COMET_BENCH_POKE_INTERVAL": str(args.poll_interval),
                    "COMET_BENCH_POLL_INTERVAL": str(args.poll_interval),
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
                for mode in args.modes:
                    result = measure_run(dep, sim, f"bench_sensor_{mode}", {"predictions": sensor_predictions},
                                         args.n, args.run_timeout)
                    sensor_results.append(result | {"mode": mode})
                    print(f"{mode}: run {result['run_state']} in {result['observed_s']:.0f} s",
                          file=sys.stderr, flush=True)
                outputs = Path(dep.home) / "outputs"
                for shape, n in args.shapes:
                    inputs, refused = nightly[n]
                    result = _nightly.run_shape(
                        shape, inputs, len(refused), outputs / f"{shape}-{n}", dep=dep, sim=sim, simulator=simulator,
                        rate=args.max_rps, timeout=args.run_timeout,
                    )
                    results.append(result)
                    if args.json:  # after every run: a long benchmark that fails late keeps what it measured
                        _write_json(args, sizes, sensor_results, results)
                    print(f"{shape} N = {n}: {result['run_state']} in {result['observed_s']:.0f} s "
                          f"(load average now {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
                settings = dep.airflow_settings()
    finally:
        if pg is not None:
            pg.stop()

    db = f"PostgreSQL {pg.bin_dir.parent.name} (tests/reliability/postgres.py)" if pg else "SQLite"
    print(describe(args, sizes, db, settings, load))
    if sensor_results:
        print()
        print(sensor_table(sensor_results))
    if results:
        print()
        print(_nightly.table(results))
        print()
        print("\n".join(f"- {line}" for line in _nightly.targets(results)))
        title = f"A nightly run on a 2-core machine ({date.today():%Y-%m-%d})"
        _chart.draw(results, _nightly.SHORT, args.chart, title)
        print(f"\nChart: {args.chart}")
    print()
    runs = ", ".join(f"{r.get('mode') or r['shape']} N = {r['n']} run {r['observed_s']:.0f} s"
                     for r in sensor_results + results)
    print(f"Total time: {time.monotonic() - t_start:.0f} s (deployment start-up {ready:.0f} s; {runs}).")
    if args.json:
        _write_json(args, sizes, sensor_results, results)


def _write_json(args: argparse.Namespace, sizes: dict, sensor_results: list, results: list) -> None:
    figures = {"args": {k: str(v) for k, v in vars(args).items()}, "code": _revision(),
               "durations": {str(n): d for n, d in sizes.items()}, "sensor_modes": sensor_results, "nightly": results}
    args.json.write_text(json.dumps(figures, indent=2))


def _revision() -> str:
    """This checkout's commit, and whether it has uncommitted changes (the code the deployment ran)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + (" with uncommitted changes" if dirty else "")


if __name__ == "__main__":
    main()
