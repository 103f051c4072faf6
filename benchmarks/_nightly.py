"""The nightly run of ``benchmarks/real_airflow.py``: one batch of predictions in four shapes, side by side.

Shapes (``SHAPES``): (a) ``mapped`` create -> deferrable sensor -> persist, (b) ``end_from_trigger``
create-and-wait ended by its trigger -> persist, (c) ``batch``: one ``PredictionBatchOperator`` (the DAGs are in
``benchmarks/dags/bench_nightly.py``), (d) ``asyncio``: ``benchmarks/floor_asyncio.py``, the same work without
Airflow. Every output is saved into a folder of its own per shape, which is checked afterwards.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._airflow_runs import measure_run
from tests.e2e.deployment import AirflowDeployment, SimulatorClient
from tests.reliability.helpers import creates, polls_per_prediction

REPO = Path(__file__).resolve().parent.parent
MODEL = "black-forest-labs/flux-schnell"
#: A prompt with this word ends ``failed`` at the simulator (``Faults.refused_words``): the failures are chosen
#: prompts, the same in every shape.
REFUSED_WORD = "forbidden"
IN_FLIGHT = 64
SHAPES = {
    "mapped": "(a) mapped create -> sensor -> persist",
    "end_from_trigger": "(b) mapped create-and-wait (end_from_trigger) -> persist",
    "batch": f"(c) PredictionBatchOperator, {IN_FLIGHT} in flight",
    "batch_worker": f"(c') PredictionBatchOperator waiting in its worker (deferrable=False), {IN_FLIGHT} in flight",
    "asyncio": f"(d) floor: plain asyncio, {IN_FLIGHT} in flight",
}
#: The task ids (endings) of the create-and-wait step, whose worker runs the table shows apart.
WAIT_STEP = {
    "mapped": (".create", ".wait"),
    "end_from_trigger": (".create",),
    "batch": ("generate",),
    "batch_worker": ("generate",),
}
#: The chart's labels.
SHORT = {"mapped": "(a) mapped", "end_from_trigger": "(b) ended by\ntrigger", "batch": "(c) batch",
         "batch_worker": "(c') batch\nin worker",
         "asyncio": "(d) asyncio"}


def nightly_inputs(
    n: int, seed: int, durations: list[float], fail_share: float
) -> tuple[list[dict[str, Any]], dict[str, float], set[int]]:
    """The batch's model inputs, the run time of each (by prompt) and the indexes whose prompt is refused
    (``round(fail_share * n)`` of them, drawn from ``seed``)."""
    refused = set(random.Random(seed + 1).sample(range(n), round(n * fail_share)))
    inputs = [
        {"prompt": f"nightly {n} #{i}" + (f" {REFUSED_WORD}" if i in refused else ""), "seed": i,
         "output_format": "webp"}
        for i in range(n)
    ]
    return inputs, {item["prompt"]: durations[i] for i, item in enumerate(inputs)}, refused


def check_folder(folder: Path, predictions: list[dict[str, Any]]) -> dict[str, int]:
    """Output files in ``folder`` against the succeeded predictions' outputs (``<id>-<index>.<ext>``)."""
    expected = set()
    for p in predictions:
        if p["status"] == "succeeded":
            outputs = p.get("output")
            count = 1 if isinstance(outputs, str) else len(outputs or [])
            expected |= {f"{p['id']}-{index}" for index in range(count)}
    found = set()
    if folder.exists():  # the batch's manifest.jsonl is not an output
        found = {path.stem for path in folder.iterdir() if path.is_file() and path.suffix != ".jsonl"}
    return {"files": len(found), "expected_files": len(expected), "missing_files": len(expected - found),
            "stray_files": len(found - expected)}


def run_shape(
    shape: str,
    inputs: list[dict[str, Any]],
    refused: int,
    folder: Path,
    *,
    dep: AirflowDeployment,
    sim: SimulatorClient,
    simulator: Any,
    rate: float,
    timeout: float,
) -> dict[str, Any]:
    """One shape over ``inputs`` (``refused`` of them refused); its figures (``measure_run``'s for the DAGs)
    and the folder's check."""
    n = len(inputs)
    folder.mkdir(parents=True)
    if shape == "asyncio":
        result = run_floor(inputs, folder, sim=sim, rate=rate, timeout=timeout)
    else:
        conf = {"inputs": inputs, "model": MODEL, "destination": folder.as_uri() + "/"}
        ended_by_trigger = WAIT_STEP[shape] if shape == "end_from_trigger" else ()
        result = measure_run(dep, sim, f"bench_nightly_{shape}", conf, n, timeout, WAIT_STEP[shape], ended_by_trigger)
    predictions = sim.predictions()
    result |= {
        "shape": shape,
        "peak_rps": simulator.max_requests_per_second(),
        "ended": {status: sum(1 for p in predictions if p["status"] == status) for status in ("succeeded", "failed")},
        "refused": refused,
        **check_folder(folder, predictions),
    }
    return result


def run_floor(
    inputs: list[dict[str, Any]], folder: Path, *, sim: SimulatorClient, rate: float, timeout: float
) -> dict[str, Any]:
    """(d): ``benchmarks/floor_asyncio.py`` in a process of its own, against the same simulator."""
    sim.reset()
    batch_file = folder.parent / f"{folder.name}-batch.json"
    figures_file = folder.parent / f"{folder.name}-figures.json"
    batch_file.write_text(json.dumps({"model": MODEL, "inputs": inputs}))
    argv = [sys.executable, "-m", "benchmarks.floor_asyncio", "--base-url", sim.base_url, "--api-key", sim.api_key,
            "--batch", str(batch_file), "--folder", str(folder), "--in-flight", str(IN_FLIGHT), "--rate", str(rate),
            "--check-every", "1", "--json", str(figures_file)]
    t0 = time.monotonic()
    subprocess.run(argv, cwd=REPO, check=True, timeout=timeout)
    observed = time.monotonic() - t0
    floor = json.loads(figures_file.read_text())
    requests = sim.requests()
    polls = polls_per_prediction(requests)
    made = creates(requests)
    return {
        "n": len(inputs), "run_state": "success" if not floor["errors"] else f"{floor['errors']} errors",
        "wall_s": floor["wall_s"], "observed_s": observed, "slot_s": 0.0, "slot_s_waits": 0.0, "worker_runs": 0,
        "worker_runs_waits": 0, "tis": 0, "retried": 0, "creates": len(made),
        "create_requests": sum(1 for r in requests if r["endpoint"] == "create"),
        "status_requests": sum(polls.values()), "floor_cpu_s": floor["cpu_s"], "triggerer_cpu_s": None,
    }


def table(results: list[dict[str, Any]]) -> str:
    head = ("shape", "N", "run", "wall s", "wall s per 1,000", "worker slot-s", "slot-s / pred",
            "worker runs / pred (create+wait step)", "task instances / pred", "creates / N", "status req / pred",
            "peak req/s", "triggerer CPU s", "failed (chosen)", "files on disk / succeeded outputs", "retried tries")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        n = r["n"]
        sent = "" if r["create_requests"] == r["creates"] else f" ({r['create_requests']} sent)"
        cpu = (f"{r['triggerer_cpu_s']:.1f}" if r["triggerer_cpu_s"] is not None
               else f"- (own process {r['floor_cpu_s']:.1f})")
        files = f"{r['files']:,} / {r['expected_files']:,}"
        if r["missing_files"] or r["stray_files"]:
            files += f" ({r['missing_files']} missing, {r['stray_files']} stray)"
        cells = (
            SHAPES[r["shape"]], f"{n:,}", r["run_state"], f"{r['wall_s']:.0f}", f"{r['wall_s'] * 1000 / n:,.0f}",
            f"{r['slot_s']:,.0f}", f"{r['slot_s'] / n:.2f}",
            f"{r['worker_runs'] / n:.2f} ({r['worker_runs_waits'] / n:.2f})", f"{r['tis'] / n:.2f}",
            f"{r['creates']:,} / {n:,}{sent}",
            f"{r['status_requests'] / n:.2f}", r["peak_rps"], cpu,
            f"{r['ended']['failed']} ({r['refused']})", files, r["retried"],
        )
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each met or not, from the largest N measured of each shape. Wall times of
    shapes measured at different N are compared per 1,000 predictions (and said so)."""
    best: dict[str, dict[str, Any]] = {}
    for r in results:
        if r["shape"] not in best or r["n"] > best[r["shape"]]["n"]:
            best[r["shape"]] = r
    same: dict[tuple[str, int], dict[str, Any]] = {(r["shape"], r["n"]): r for r in results}
    out = []

    def per_k(r: dict[str, Any]) -> float:
        return r["wall_s"] * 1000 / r["n"]

    def compare(x: str, y: str) -> tuple[dict, dict, str]:
        """The pair to compare: at the same N when both ran at it (the largest such), else per 1,000."""
        common = sorted({r["n"] for r in results if r["shape"] == x} & {r["n"] for r in results if r["shape"] == y})
        if common:
            return same[(x, common[-1])], same[(y, common[-1])], f"at N = {common[-1]:,}"
        return best[x], best[y], f"per 1,000 predictions ({x} at N = {best[x]['n']:,}, {y} at N = {best[y]['n']:,})"

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if "batch" in best and "asyncio" in best:
        c, d, how = compare("batch", "asyncio")
        ratio = per_k(c) / per_k(d)
        out.append(f"(c) within 1.25x of (d)'s wall time: {ratio:.2f}x {how}: {verdict(ratio <= 1.25)}")
    if "batch" in best and "mapped" in best:
        c, a, how = compare("batch", "mapped")
        speed = per_k(a) / per_k(c)
        out.append(f"(c) at least 5x faster than (a): {speed:.1f}x {how}: {verdict(speed >= 5)}")
        share = (c["slot_s"] / c["n"]) / (a["slot_s"] / a["n"])
        out.append(f"(c) at most 1/20 of (a)'s worker slot-seconds: 1/{1 / share:.0f} per prediction {how}: "
                   f"{verdict(share <= 1 / 20)}")
    if "end_from_trigger" in best:
        b = best["end_from_trigger"]
        step, total = b["worker_runs_waits"] / b["n"], b["worker_runs"] / b["n"]
        out.append(f"(b) at most 1.2 worker runs per prediction: {step:.2f} for the create-and-wait step "
                   f"({total:.2f} with the persist task and the inputs task): {verdict(step <= 1.2)} for the step, "
                   f"{verdict(total <= 1.2)} for the whole pipeline")
    exact = all(r["creates"] == r["n"] and r["create_requests"] == r["n"] for r in results)
    files = all(not r["missing_files"] and not r["stray_files"] for r in results)
    out.append(f"every shape exactly N creates: {verdict(exact)}; every output file on disk: {verdict(files)}")
    return out
