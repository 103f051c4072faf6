"""How many objects the garbage collector walks per waiting trigger, for each benchmark side.

    .venv/airflow-3.3/bin/python benchmarks/gc_objects.py            # about a minute a side

A full garbage collection walks every GC-tracked object of the process, so the objects each waiting
trigger keeps alive set how long the triggerer's event loop stalls when one runs with thousands of
triggers waiting (``triggers.py`` reports those stalls). For each side, in a fresh process: ``--n``
predictions that run far longer than the measurement are created on the simulator, their triggers start
spread over 5 s (as the triggerer picks them up) and poll for 12 s; then the tracked objects are counted
against the count before the first trigger (start-up heap frozen out of the count with ``gc.freeze``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._measure import start_waiting  # noqa: E402
from benchmarks._sim import SimProcess  # noqa: E402

SIDES = ("idle", "prediction", "http_sensor", "naive")
KEY = "gc-objects-key"


def _trigger(side: str, prediction_id: str) -> Any:
    if side == "prediction":
        from airflow_comet.triggers.prediction import PredictionTrigger

        return PredictionTrigger(
            prediction_id=prediction_id, cometapi_conn_id="cb", started_at=time.time(), end_time=time.time() + 3600
        )
    from benchmarks import baselines

    if side == "http_sensor":
        return baselines.StatusHttpSensorTrigger(
            endpoint=f"replicate/v1/predictions/{prediction_id}", http_conn_id="hb", method="GET", poke_interval=5.0
        )
    if side == "naive":
        return baselines.FixedIntervalTrigger(prediction_id=prediction_id, http_conn_id="hb", interval=2.0)
    return baselines.IdleTrigger(prediction_id=prediction_id, started_at=time.time(), lifetime=3600)


async def measure(side: str, n: int) -> dict[str, Any]:
    sim = await SimProcess(KEY, {"durations": {"black-forest-labs/flux-schnell": [600, 600]}}).start()
    try:
        os.environ.update(sim.connection_env())
        triggers = [_trigger(side, pid) for pid in await sim.create_predictions(n)]
        gc.collect()
        gc.freeze()
        before = len(gc.get_objects())
        tasks = start_waiting(triggers, 5.0)
        await asyncio.sleep(17)
        gc.collect()
        objects = gc.get_objects()
        types = collections.Counter(type(o).__name__ for o in objects)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {"side": side, "n": n, "per_trigger": (len(objects) - before) / n, "types": types.most_common(12)}
    finally:
        await sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this side in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(measure(args.one, args.n))))
        return
    print(f"| side | GC-tracked objects per waiting trigger (N = {args.n:,}) | most common types, whole process |")
    print("|---|---|---|")
    for side in args.sides:
        out = subprocess.run(
            [sys.executable, __file__, "--one", side, "--n", str(args.n)],
            capture_output=True, text=True, check=True, cwd=REPO,
            env={**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"},
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        types = ", ".join(f"{name} {count:,}" for name, count in row["types"][:6])
        print(f"| {side} | {row['per_trigger']:.1f} | {types} |", flush=True)


if __name__ == "__main__":
    main()
