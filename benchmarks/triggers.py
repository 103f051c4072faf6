"""Benchmark: N deferred predictions watched by one triggerer process, against the simulator.

    .venv/airflow-3.3/bin/python benchmarks/triggers.py --n 100 1000 5000

For every N, four sides run on the same workload (same seed: the same models in the same order, so the
simulator draws the same durations):

- ``PredictionTrigger`` (this provider);
- ``HttpSensorTrigger`` at its default 5 s, as ``HttpSensor(deferrable=True)`` would run it
  (``benchmarks/baselines.py`` says exactly what was adapted and why);
- a naive fixed 2 s loop (one keep-alive aiohttp session per trigger);
- the floor: an idle trigger that sends nothing and sleeps once, for as long as a prediction of its model
  runs (what a trigger and the harness cost the triggerer without any request or extra wake-up; the "CPU
  above floor" column compares what the sides spend on top).

Plus a budget run: N = 1,000 ``PredictionTrigger`` with the connection extra ``max_requests_per_second``
= 50. ``--compare-own-loop`` adds, at the largest N, ``PredictionTrigger`` as it was before the shared
poller: each trigger sleeping and polling on its own (``benchmarks/_variants.py``).

Every run gets its own simulator process and its own triggerer process (``benchmarks/_triggerer.py``); this
process only creates the predictions (spread evenly over ``--ramp`` seconds, 70% running 2-10 s, 25% 10-60 s,
5% 60-120 s), hands each trigger's ``serialize()`` output to the triggerer as a deferring task would, and
reads the simulator's books through its admin endpoints afterwards. By default the N < 1,000 runs and the
budget run go together (they are light), and every N >= 1,000 run goes alone, back to back, on an otherwise
quiet machine (``--serial``: everything alone; ``--together``: the sides of each N at the same time, so that
a machine whose speed drifts between runs, as a shared VM's does, changes every side's CPU alike).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import platform
import random
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from benchmarks._sim import SimProcess, cpu_seconds  # noqa: E402

#: (model, share of the predictions, run time in seconds: uniform between the two)
WORKLOAD = (
    ("black-forest-labs/flux-schnell", 0.70, (2.0, 10.0)),
    ("black-forest-labs/flux-dev", 0.25, (10.0, 60.0)),
    ("black-forest-labs/flux-1.1-pro", 0.05, (60.0, 120.0)),
)
SIDES = {
    "prediction": "PredictionTrigger",
    "http_sensor": "HttpSensorTrigger (5 s)",
    "naive": "naive fixed 2 s loop",
    "idle": "floor: idle trigger, no I/O",
}
BASELINE = "http_sensor"
COMET_CONN = "cometapi_bench"
HTTP_CONN = "http_bench"


@dataclass
class Case:
    side: str
    n: int
    budget: float | None = None
    own_loop: bool = False
    alone: bool = True

    @property
    def label(self) -> str:
        text = SIDES[self.side]
        if self.budget:
            text += f", budget {self.budget:g}/s"
        if self.own_loop:
            text += " polling on its own (before the shared poller)"
        return text


@dataclass
class Outcome:
    case: Case
    result: dict[str, Any]
    predictions: dict[str, dict[str, Any]]
    status_requests: list[dict[str, Any]]
    stats: dict[str, Any]
    creator_connections: int
    peak_cpu: dict[str, float]
    ran_with: list[str] = field(default_factory=list)


# -- one run ------------------------------------------------------------------------------------------


def _trigger_line(case: Case, prediction: dict[str, Any]) -> dict[str, Any]:
    pid = prediction["id"]
    if case.side == "prediction":
        from airflow_comet.operators._waiting import created_epoch
        from airflow_comet.triggers.prediction import PredictionTrigger

        # As CreatePredictionOperator(deferrable=True) builds it: default poll_interval and 1 h timeout.
        trigger = PredictionTrigger(
            prediction_id=pid,
            cometapi_conn_id=COMET_CONN,
            poll_interval=20.0,
            started_at=created_epoch(prediction),
            end_time=time.time() + 3600,
        )
    elif case.side == "http_sensor":
        from benchmarks.baselines import StatusHttpSensorTrigger

        trigger = StatusHttpSensorTrigger(
            endpoint=f"replicate/v1/predictions/{pid}", http_conn_id=HTTP_CONN, method="GET", poke_interval=5.0
        )
    elif case.side == "idle":
        from airflow_comet.operators._waiting import created_epoch
        from benchmarks.baselines import IdleTrigger

        # As long as the simulator's run of a prediction of that model would be (drawn per prediction).
        spans = {model: span for model, _, span in WORKLOAD}
        low, high = spans.get(prediction.get("model"), WORKLOAD[0][2])
        trigger = IdleTrigger(
            prediction_id=pid,
            started_at=created_epoch(prediction),
            lifetime=random.Random(pid).uniform(low, high),
        )
    else:
        from benchmarks.baselines import FixedIntervalTrigger

        trigger = FixedIntervalTrigger(prediction_id=pid, http_conn_id=HTTP_CONN, interval=2.0)
    classpath, kwargs = trigger.serialize()
    # Through JSON, as the trigger row in the metadata database would hold it.
    return {"key": pid, "classpath": classpath, "kwargs": json.loads(json.dumps(kwargs))}


def _models(n: int, seed: int) -> list[str]:
    counts = [round(n * share) for _, share, _ in WORKLOAD]
    counts[0] += n - sum(counts)
    models = [model for (model, _, _), count in zip(WORKLOAD, counts) for _ in range(count)]
    random.Random(seed).shuffle(models)
    return models


async def run_case(case: Case, args: argparse.Namespace) -> Outcome:
    """One (side, N) run; whatever happens, the processes it started are gone when it returns."""
    started: list[Any] = []
    try:
        return await _run_case(case, args, started)
    finally:
        for proc in reversed(started):
            if isinstance(proc, SimProcess):
                await proc.stop()
            elif proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _run_case(case: Case, args: argparse.Namespace, started: list[Any]) -> Outcome:
    key = f"bench-{case.side}-{case.n}-{secrets.token_hex(6)}"
    faults = {"durations": {model: list(span) for model, _, span in WORKLOAD}}
    sim = SimProcess(key, faults, seed=args.seed)
    started.append(sim)
    await sim.start()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    api_url, proxy = sim.base_url, None
    if args.tls:
        tls_dir = workdir / f"{key}-tls"
        tls_dir.mkdir()
        proxy = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks._tls_proxy", "--upstream", sim.base_url.rsplit(":", 1)[1],
            "--dir", str(tls_dir), stdout=asyncio.subprocess.PIPE, cwd=REPO,
        )
        started.append(proxy)
        assert proxy.stdout is not None
        line = (await asyncio.wait_for(proxy.stdout.readline(), timeout=60)).decode()
        api_url = line.split("listening on ", 1)[1].strip()
        env["SSL_CERT_FILE"] = str(tls_dir / "cert.pem")  # aiohttp's CAs (HttpSensorTrigger's side)
    extra: dict[str, Any] = {}
    if args.tls:
        # The connection's own setting, as a user trusting a company CA would: SSL_CERT_FILE alone loses to
        # REQUESTS_CA_BUNDLE where that is set (the hook honours it, as requests does).
        extra["verify"] = str(tls_dir / "cert.pem")
    if case.budget:
        extra["max_requests_per_second"] = case.budget
    env["AIRFLOW_CONN_" + COMET_CONN.upper()] = json.dumps(
        {"conn_type": "cometapi", "password": key, "host": api_url, "extra": extra}
    )
    env["AIRFLOW_CONN_" + HTTP_CONN.upper()] = json.dumps(
        {"conn_type": "http", "host": api_url, "extra": {"Authorization": f"Bearer {key}"}}
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    env["NO_PROXY"] = "127.0.0.1,localhost"

    out = workdir / f"{key}.json"
    log = open(workdir / f"{key}.log", "wb")
    ramp = args.ramp if args.ramp is not None else max(5.0, case.n / 500)
    deadline = ramp + 120 + 180
    first_line = _trigger_line(case, {"id": "x", "created_at": None})
    command = [sys.executable, "-m", "benchmarks._triggerer", "--out", str(out), "--deadline", str(deadline)]
    command += ["--preload", first_line["classpath"]]
    if case.own_loop:
        command.append("--own-loop")
    if args.no_greenback:
        command.append("--no-greenback")
    if args.uvloop:
        command.append("--uvloop")
    if args.gc_freeze:
        command.append("--gc-freeze")
    if args.gc_census:
        command.append("--gc-census")
    if case.side == "prediction":
        for name in args.variant:
            command += ["--variant", name]
    if args.profile:
        command += ["--profile", str(workdir / f"{key}.prof")]
    ready = workdir / f"{key}.ready"
    command += ["--ready-file", str(ready)]
    # Its stdout and stderr (where Airflow 3's structlog writes the triggers' logs) go straight to a file,
    # never to a pipe that could fill up and block it.
    child = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stdout=log, stderr=log, cwd=REPO, env=env
    )
    started.append(child)
    assert child.stdin is not None
    waited = time.monotonic()
    while not ready.exists():
        if child.returncode is not None or time.monotonic() - waited > 120:
            raise RuntimeError(f"the triggerer process did not start (see {log.name})")
        await asyncio.sleep(0.1)

    # CPU of both processes, sampled every second, for the peak one-second utilisation of each.
    peak = {"triggerer": 0.0, "simulator": 0.0}
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        last = {"triggerer": cpu_seconds(child.pid), "simulator": cpu_seconds(sim.pid)}
        last_t = time.monotonic()
        while not stop_sampling.is_set():
            await asyncio.sleep(1.0)
            now = {"triggerer": cpu_seconds(child.pid), "simulator": cpu_seconds(sim.pid)}
            now_t = time.monotonic()
            for name in peak:
                peak[name] = max(peak[name], (now[name] - last[name]) / (now_t - last_t))
            last, last_t = now, now_t

    sampler = asyncio.create_task(sample())

    created_connections = 0

    async def on_connection(*_: Any) -> None:
        nonlocal created_connections
        created_connections += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_connection)
    models = _models(case.n, args.seed)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(32)
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {key}"},
        connector=aiohttp.TCPConnector(limit=32),
        trace_configs=[trace],
    ) as session:
        start = loop.time()

        async def create(i: int, model: str) -> None:
            await asyncio.sleep(max(0.0, start + i * ramp / case.n - loop.time()))
            async with gate:
                url = f"{sim.base_url}/replicate/v1/models/{model}/predictions"
                async with session.post(url, json={"input": {"prompt": f"benchmark {i}", "seed": i}}) as response:
                    response.raise_for_status()
                    prediction = await response.json()
            child.stdin.write(json.dumps(_trigger_line(case, prediction)).encode() + b"\n")

        await asyncio.gather(*(create(i, model) for i, model in enumerate(models)))
    child.stdin.write(json.dumps({"done": case.n}).encode() + b"\n")
    await child.stdin.drain()
    try:
        await asyncio.wait_for(child.wait(), timeout=deadline + 60)
    except asyncio.TimeoutError:
        child.kill()
        await child.wait()
        raise RuntimeError(f"{case.label} N={case.n}: the triggerer process did not finish (see {log.name})")
    finally:
        stop_sampling.set()
        await sampler
        log.close()
    if child.returncode != 0:
        raise RuntimeError(f"{case.label} N={case.n}: the triggerer process failed (see {log.name})")
    result = json.loads(out.read_text())
    stats = await sim.admin("stats")
    predictions = {p["id"]: p for p in (await sim.admin("predictions"))["predictions"]}
    status_requests = (await sim.admin("requests", endpoint="status"))["requests"]
    await sim.stop()
    if proxy is not None:
        proxy.terminate()
        await proxy.wait()
    return Outcome(
        case=case,
        result=result,
        predictions=predictions,
        status_requests=[
            {"t": r["time"], "pid": r["prediction_id"], "status": r["status"]} for r in status_requests
        ],
        stats=stats,
        creator_connections=created_connections,
        peak_cpu=peak,
    )


# -- figures ------------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _failed_wait(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("status") in ("error", "timeout")


def figures(o: Outcome) -> dict[str, Any]:
    n = o.case.n
    # A wait that ended in an "error" or "timeout" event did not see its prediction end: an error, not a
    # detection (every side but PredictionTrigger reports only the prediction's own statuses).
    waits_failed = {pid for pid, (_, payload) in o.result["events"].items() if _failed_wait(payload)}
    events = {pid: e for pid, e in o.result["events"].items() if pid not in waits_failed}
    per_pid = collections.Counter(r["pid"] for r in o.status_requests)
    windows = collections.Counter(int(r["t"]) for r in o.status_requests)
    durations = {pid: p["sim_duration"] for pid, p in o.predictions.items()}
    # The idle floor fires whenever it likes: its "latency" would mean nothing.
    latency = {} if o.case.side == "idle" else {
        pid: t - o.predictions[pid]["sim_terminal_epoch"] for pid, (t, _) in events.items()
    }
    under10 = [lat for pid, lat in latency.items() if durations[pid] < 10]
    under60 = [lat for pid, lat in latency.items() if durations[pid] < 60]
    over60 = [pid for pid, d in durations.items() if d > 60]
    created = {pid: p["sim_terminal_epoch"] - p["sim_duration"] for pid, p in o.predictions.items()}
    pickup = [t - created[pid] for pid, t in o.result["picked"].items()]
    handed = [t - created[pid] for pid, t in o.result.get("arrived", {}).items()]
    near60 = [per_pid[pid] for pid, d in durations.items() if 55 <= d <= 60]
    rss_growth = max(0, o.result["rss_peak_kb"] - o.result["rss_base_kb"])
    return {
        "run": o.case.label,
        "side": o.case.side,
        "n": n,
        "budget": o.case.budget,
        "own_loop": o.case.own_loop,
        "ran_with": o.ran_with,
        "events": len(events),
        "errors": len(o.result["errors"]) + len(waits_failed),
        "timed_out": o.result["timed_out"],
        "cpu_s": o.result["cpu_s"],
        "cpu_user_s": o.result["cpu_user_s"],
        "cpu_system_s": o.result["cpu_system_s"],
        "cpu_per_1k": o.result["cpu_s"] / n * 1000,
        "wall_s": o.result["wall_s"],
        "rss_base_mb": o.result["rss_base_kb"] / 1024,
        "rss_peak_mb": o.result["rss_peak_kb"] / 1024,
        "max_alive": o.result["max_alive"],
        "kb_per_trigger": rss_growth / max(1, o.result["max_alive"]),
        "requests": len(o.status_requests),
        "req_per_pred": len(o.status_requests) / n,
        "req_per_pred_over60": statistics.fmean(per_pid[p] for p in over60) if over60 else math.nan,
        "req_55_60s_max": max(near60) if near60 else None,
        "req_55_60s_mean": statistics.fmean(near60) if near60 else None,
        "status_429": sum(1 for r in o.status_requests if r["status"] == 429),
        "connections": o.stats["connections_opened"].get("api", 0) - o.creator_connections,
        "lat_p50": _pct(list(latency.values()), 0.50),
        "lat_p95": _pct(list(latency.values()), 0.95),
        "lat_max": max(latency.values(), default=math.nan),
        "lat10_p50": _pct(under10, 0.50),
        "lat10_p95": _pct(under10, 0.95),
        "lat10_max": max(under10, default=math.nan),
        "lat60_max": max(under60, default=math.nan),
        "pickup_p50": _pct(pickup, 0.5),
        "pickup_p95": _pct(pickup, 0.95),
        "pickup_max": max(pickup, default=math.nan),
        "handed_p50": _pct(handed, 0.5),
        "handed_max": max(handed, default=math.nan),
        # The longest the loop was blocked: the ticker's lateness, or a garbage collection, whichever is
        # longer (the ticker sees only the part of a block past its next tick: a 125 ms collection starting
        # just after one shows as 75 ms late).
        "max_stall_ms": max(o.result["max_stall_s"], *o.result["gc_max_s"]) * 1000,
        "ticker_stall_ms": o.result["max_stall_s"] * 1000,
        "stalls_over_100ms": o.result["stalls_over_100ms"],
        "gc_full_max_ms": o.result["gc_max_s"][2] * 1000,
        "gc_full_count": o.result["gc_count"][2],
        "gc_total_s": o.result["gc_total_s"],
        "full_gcs": o.result["full_gcs"],
        "promoted": o.result.get("promoted", {}),
        "startup_objects": o.result["startup_objects"],
        "max_rps": max(windows.values(), default=0),
        "max_rps_all": o.stats["max_requests_per_second"],
        "peak_cpu_triggerer": o.peak_cpu["triggerer"],
        "peak_cpu_simulator": o.peak_cpu["simulator"],
    }


def _f(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def _above_floor(row: dict[str, Any], base: dict[str, Any] | None, floor: float | None) -> str:
    """CPU above the idle floor, as a ratio to the baseline's: what the status checks themselves cost, since
    every side pays the floor (being rebuilt, scheduled, woken and finished) whatever it does."""
    if base is None or floor is None or row["side"] == "idle":
        return "-"
    if min(row["cpu_per_1k"], base["cpu_per_1k"]) <= floor:  # within noise of the floor: no meaningful ratio
        return "-"
    return _f((row["cpu_per_1k"] - floor) / (base["cpu_per_1k"] - floor))


def table(rows: list[dict[str, Any]]) -> str:
    base = {r["n"]: r for r in rows if r["side"] == BASELINE and not r["budget"] and not r["own_loop"]}
    floor = {r["n"]: r["cpu_per_1k"] for r in rows if r["side"] == "idle"}
    head = (
        "| run | N | CPU s / 1k pred | peak RSS MB | KB / trigger | req / pred | req / pred > 60 s "
        "| conns opened | latency p50 / p95 / max s | < 10 s: p95 / max s | worst stall ms | max req/s "
        "| CPU × | CPU above floor × | req × | p95 < 10 s × |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        b = base.get(r["n"])
        ratio = lambda key: _f(r[key] / b[key]) if b and b[key] else "-"  # noqa: E731
        above = _above_floor(r, b, floor.get(r["n"]))
        lines.append(
            "| "
            + " | ".join(
                [
                    r["run"],
                    _f(r["n"]),
                    _f(r["cpu_per_1k"], 2),
                    _f(r["rss_peak_mb"], 0),
                    _f(r["kb_per_trigger"], 1),
                    _f(r["req_per_pred"], 2),
                    _f(r["req_per_pred_over60"], 1),
                    _f(r["connections"]),
                    f"{_f(r['lat_p50'])} / {_f(r['lat_p95'])} / {_f(r['lat_max'])}",
                    f"{_f(r['lat10_p95'])} / {_f(r['lat10_max'])}",
                    _f(r["max_stall_ms"], 0),
                    _f(r["max_rps"]),
                    ratio("cpu_per_1k"),
                    above,
                    ratio("req_per_pred"),
                    ratio("lat10_p95"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def details(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        lines.append(
            f"- {r['run']}, N={r['n']:,}: {r['events']:,}/{r['n']:,} events, {r['errors']} errors, "
            f"wall {r['wall_s']:.0f} s, CPU {r['cpu_s']:.1f} s (user {r['cpu_user_s']:.1f}, system "
            f"{r['cpu_system_s']:.1f}), RSS {r['rss_base_mb']:.0f} -> "
            f"{r['rss_peak_mb']:.0f} MB with at most {r['max_alive']:,} triggers running, "
            f"{r['requests']:,} status requests ({r['status_429']} answered 429), "
            f"55-60 s predictions: mean {_f(r['req_55_60s_mean'], 1)} / max {_f(r['req_55_60s_max'])} requests, "
            f"worst latency < 60 s {_f(r['lat60_max'])} s, pick-up after create p50/p95/max "
            f"{_f(r['pickup_p50'])}/{_f(r['pickup_p95'])}/{_f(r['pickup_max'])} s (handed over after p50 "
            f"{_f(r['handed_p50'])}, max {_f(r['handed_max'])} s), ticker late > 100 ms: {r['stalls_over_100ms']} "
            f"(at most {r['ticker_stall_ms']:.0f} ms), "
            f"full GCs {r['gc_full_count']} (longest {r['gc_full_max_ms']:.0f} ms, all GCs {r['gc_total_s']:.1f} s), "
            f"max req/s incl. creates {r['max_rps_all']}, peak CPU (share of one core over 1 s): triggerer "
            f"{r['peak_cpu_triggerer']:.0%}, simulator {r['peak_cpu_simulator']:.0%}"
            + (f"; ran at the same time as: {', '.join(r['ran_with'])}" if r["ran_with"] else "; ran alone")
            + _census(r)
        )
    return "\n".join(lines)


def _census(r: dict[str, Any]) -> str:
    """With ``--gc-census``: what each full collection walked, against the heap the triggers started beside, and
    what young collections promoted to the oldest generation (what brings the next full one closer)."""
    if not r["full_gcs"] and not r["promoted"]:
        return ""
    walked = ", ".join(
        f"{objects / 1000:.0f}k objects in {ms:.0f} ms ({alive:,} triggers running)" for ms, objects, alive in r["full_gcs"]
    )
    promoted = r["promoted"]
    top = ", ".join(f"{name} {count / 1000:.1f}k" for name, count in list(promoted.items())[:8])
    return (
        f"; full GCs walked {walked or 'nothing (none ran)'}; start-up heap {r['startup_objects'] / 1000:.0f}k objects; promoted to the "
        f"oldest generation {sum(promoted.values()) / 1000:.0f}k objects ({top})"
    )


def machine() -> str:
    import aiohttp as _aiohttp

    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    try:
        from importlib.metadata import version

        airflow_version = version("apache-airflow")
        http_version = version("apache-airflow-providers-http")
    except Exception:  # noqa: BLE001
        airflow_version = http_version = "?"
    return (
        f"{os.cpu_count()} CPUs ({model}), {mem_kb / 1024 / 1024:.0f} GB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, aiohttp {_aiohttp.__version__}, "
        f"Airflow {airflow_version}, apache-airflow-providers-http {http_version}"
    )


# -- main ---------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[list[Case]]:
    per_n = [[Case(side, n) for side in args.sides] for n in args.n]  # --n 1000 1000: two runs of each side
    cases = [case for group in per_n for case in group]
    if args.budget:
        cases.append(Case("prediction", args.budget_n, budget=args.budget))
    if args.compare_own_loop:
        cases.append(Case("prediction", max(args.n), own_loop=True))
    if args.serial:
        return [[case] for case in cases]
    if args.together:
        # Each N's sides at once: whatever the machine does meanwhile (a VM's neighbours, frequency changes)
        # it does to every side, so their CPU ratios hold even when a run's absolute figures move.
        return per_n + [[c] for c in cases if c.budget or c.own_loop]
    light = [c for c in cases if c.n < 1000 or c.budget]
    heavy = [c for c in cases if c not in light]
    return ([light] if light else []) + [[c] for c in heavy]


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for phase in plan(args):
        names = [f"{c.label} N={c.n:,}" for c in phase]
        print(f"# running {' + '.join(names)} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        outcomes = await asyncio.gather(*(run_case(c, args) for c in phase))
        for o in outcomes:
            o.ran_with = [f"{c.label} N={c.n:,}" for c in phase if c is not o.case]
            rows.append(figures(o))
        print(f"#   done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    parser.add_argument("--budget", type=float, default=50.0, help="the budget run's max_requests_per_second (0: skip)")
    parser.add_argument("--budget-n", type=int, default=1000)
    parser.add_argument("--compare-own-loop", action="store_true",
                        help="also PredictionTrigger polling on its own, as before the shared poller, at the largest N")
    parser.add_argument("--ramp", type=float, default=None, help="seconds over which predictions are created "
                        "(default: 5 s, or N / 500 s when longer)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--serial", action="store_true", help="run every case alone, back to back")
    parser.add_argument("--together", action="store_true",
                        help="run the sides of each N at the same time (CPU ratios under the same machine conditions)")
    parser.add_argument("--no-greenback", action="store_true", help="skip greenback.ensure_portal() per trigger")
    parser.add_argument("--uvloop", action="store_true", help="run the triggerer's loop on uvloop")
    parser.add_argument("--tls", action="store_true",
                        help="put a TLS proxy (its own process) in front of the simulator, as the real API is https")
    parser.add_argument("--variant", action="append", default=[], choices=["jitter_first_poll", "wide_batches", "narrow_batches", "untimed_batches"],
                        help="measure a suggested change to PredictionTrigger's side (benchmarks/_variants.py)")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() the triggerer's start-up heap (Airflow's triggerer does not)")
    parser.add_argument("--gc-census", action="store_true",
                        help="count the objects each full garbage collection walked, and by type those young collections "
                        "promoted to the oldest generation (the counts block the loop too: stall figures of such a run "
                        "are not comparable)")
    parser.add_argument("--profile", action="store_true", help="cProfile each triggerer process (slower)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--workdir", default=None, help="where the triggerer processes write logs and results")
    args = parser.parse_args()
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="comet-bench-")
    started = time.monotonic()
    rows = asyncio.run(main_async(args))
    print(f"Machine: {machine()}")
    print(
        "Every run: its own simulator process and its own triggerer process (CPU and memory are the "
        "triggerer's alone). "
        + ("Every case ran alone, back to back." if args.serial else
           "The sides of each N ran at the same time (each its own CPU time; they shared the machine's cores)."
           if args.together else
           "Runs with N >= 1,000 ran alone, back to back, on an otherwise quiet machine; the N < 1,000 runs "
           "and the budget run ran at the same time as one another.")
    )
    print("Sides: PredictionTrigger as CreatePredictionOperator(deferrable=True) defers it (poll_interval 20 s); "
          "HttpSensorTrigger at poke_interval 5 s through HttpAsyncHook, a new aiohttp session per poll, adapted only "
          "to treat a running status as its 404 'not yet' (benchmarks/baselines.py; HttpSensor's first poke in the "
          "worker before deferring is not counted); the naive loop polls every 2 s over one keep-alive aiohttp "
          "session per trigger; the floor is an idle trigger that sleeps once, as long as its prediction runs, "
          "without any request. Requests are status checks only (creates come from the workers).")
    print(f"Predictions: 70% 2-10 s, 25% 10-60 s, 5% 60-120 s; created evenly over "
          f"{'max(5 s, N / 500 s)' if args.ramp is None else f'{args.ramp:g} s'}; seed {args.seed}; "
          f"greenback portal per trigger: {'no' if args.no_greenback else 'yes (as Airflow 3)'}; "
          f"loop: {'uvloop' if args.uvloop else 'asyncio'}; "
          f"{'HTTPS through a TLS proxy in its own process' if args.tls else 'plain HTTP on loopback (no TLS)'}"
          f"{'; start-up heap gc.freeze()d' if args.gc_freeze else ''}"
          f"{'; objects walked by each full collection counted (stalls not comparable)' if args.gc_census else ''}"
          f"{'; variants: ' + ', '.join(args.variant) if args.variant else ''}.")
    print()
    print(table(rows))
    print()
    print(details(rows))
    print(f"\nTotal benchmark time {time.monotonic() - started:.0f} s; logs in {args.workdir}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
