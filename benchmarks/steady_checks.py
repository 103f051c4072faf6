"""CPU and garbage collections per status check of waiting PredictionTriggers, in steady state; two
checkouts side by side.

    .venv/airflow-3.3/bin/python benchmarks/steady_checks.py                      # this checkout alone
    git worktree add /tmp/before <commit>
    .venv/airflow-3.3/bin/python benchmarks/steady_checks.py . /tmp/before        # alternating, 3 rounds each

``--n`` predictions that run far longer than the measurement are created on the simulator (its own
process); their triggers start over 2 s in one event loop (greenback's portal each, as Airflow 3's
triggerer), are past the schedule's young phase (created 30 s ago) and check every ``poll_interval`` = 2 s.
After 6 s of warm-up, the process's CPU and its garbage collections (per generation) are counted for
``--window`` seconds against the status checks the simulator answered. No creates and no events (and no log
lines from the code since 3dd3cc1; older code logs each trigger's first status, during the warm-up): the
cost of a check alone, which ``triggers.py`` cannot separate from everything else a trigger does. Each
checkout runs in a fresh process of its own (``--one``), so the code measured is that checkout's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


async def measure(code: Path, n: int, window: float) -> dict[str, object]:
    from benchmarks._measure import cpu_seconds, start_waiting
    from benchmarks._sim import SimProcess

    sim = await SimProcess("steady-key", {"durations": {"black-forest-labs/flux-schnell": [600, 600]}}).start()
    try:
        os.environ.update(sim.connection_env())
        import airflow_comet
        from airflow_comet.triggers.prediction import PredictionTrigger

        if not Path(airflow_comet.__file__).resolve().is_relative_to(code):
            raise RuntimeError(f"measuring {code} but imported {airflow_comet.__file__}")
        now = time.time()
        triggers = [
            PredictionTrigger(pid, cometapi_conn_id="cb", started_at=now - 30, end_time=now + 3600, poll_interval=2.0)
            for pid in await sim.create_predictions(n)
        ]
        tasks = start_waiting(triggers, 2.0)
        await asyncio.sleep(6)
        collections = [0, 0, 0]

        def count(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                collections[info["generation"]] += 1

        gc.callbacks.append(count)
        requests_before, cpu_before = (await sim.admin("stats"))["requests"], cpu_seconds()
        await asyncio.sleep(window)
        cpu = cpu_seconds() - cpu_before
        checks = (await sim.admin("stats"))["requests"] - requests_before  # admin calls are not recorded
        if not checks:
            raise RuntimeError("no status check in the window")
        gc.callbacks.remove(count)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {"checks": checks, "us_per_check": 1e6 * cpu / checks, "collections": collections}
    finally:
        await sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("code", nargs="*", default=[str(REPO)], help="checkouts to measure (default: this one)")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--window", type=float, default=25.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this checkout in this process
    args = parser.parse_args()
    if args.one:
        code = Path(args.one).resolve()
        # This checkout's benchmark helpers (imported first, so the package stays this one's), then that
        # checkout's airflow_comet, ahead of this one and of the editable install's finder.
        sys.path.insert(0, str(REPO))
        import benchmarks._measure  # noqa: F401
        import benchmarks._sim  # noqa: F401

        sys.path.insert(0, str(code))
        logging.disable(logging.WARNING)
        print(json.dumps(asyncio.run(measure(code, args.n, args.window))))
        return
    print("| checkout | round | status checks | CPU µs per check | collections gen 0 / 1 / 2 |")
    print("|---|---|---|---|---|")
    codes = [str(Path(code).resolve()) for code in args.code]
    for round_ in range(1, args.rounds + 1):
        for code in codes:
            out = subprocess.run(
                [sys.executable, __file__, "--one", code, "--n", str(args.n), "--window", str(args.window)],
                capture_output=True, text=True, check=True, cwd=REPO,
                env={**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"},
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            gens = " / ".join(str(c) for c in row["collections"])
            print(f"| {code} | {round_} | {row['checks']:,} | {row['us_per_check']:.0f} | {gens} |", flush=True)


if __name__ == "__main__":
    main()
