"""Benchmark: what ``Prefer: wait`` saves on a 2 s prediction (requests and end-to-end task time).

    .venv/airflow-3.3/bin/python benchmarks/prefer_wait.py [--runs 10] [--duration 2]

Against the simulator in its own process (every prediction runs exactly ``--duration`` seconds), one
prediction at a time, three ways the operator can run:

- ``wait in worker``: ``create_prediction`` then the operator's own blocking wait
  (``PredictionWaitMixin._wait_in_worker``: the poll schedule, first check 1.7 s after creation);
- ``deferred``: ``create_prediction`` then ``PredictionTrigger`` run to its event in an event loop, as the
  triggerer would (Airflow's own defer/resume round trip, seconds in a real deployment, is not included);
- ``prefer_wait=N``: ``create_prediction(..., prefer_wait=N)``, which the simulator (like Replicate) holds
  until the prediction is done, so the operator finishes without polling or deferring.

Requests are counted by the simulator (creates + status checks of that prediction).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# Airflow 3 logs every status change at INFO to stdout: keep the table readable (warnings still show).
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")

MODEL = "black-forest-labs/flux-schnell"
KEY = "bench-prefer-wait-key"


def start_simulator(duration: float) -> tuple[Any, str]:
    import re
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_comet.testing", "--port", "0", "--api-key", KEY,
         "--faults", json.dumps({"durations": duration})],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    found = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    if not found:
        proc.terminate()
        raise RuntimeError(f"the simulator did not start: {line!r}")
    return proc, found.group(1)


def admin(base_url: str, name: str, **query: str) -> Any:
    from urllib.parse import urlencode

    url = f"{base_url}/_simulator/{name}" + (f"?{urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - loopback simulator
        return json.loads(response.read())


def run_once(mode: str, prefer_wait: int) -> tuple[str, float, str]:
    from airflow_comet.hooks.cometapi import CometAPIHook
    from airflow_comet.operators._waiting import PredictionWaitMixin, created_epoch
    from airflow_comet.polling import is_terminal
    from airflow_comet.triggers.prediction import PredictionTrigger

    hook = CometAPIHook()
    started = time.monotonic()
    prediction = hook.create_prediction(
        MODEL, {"prompt": "a paper boat", "aspect_ratio": "1:1"}, prefer_wait=prefer_wait if mode == "prefer" else None
    )
    if is_terminal(prediction):
        status = prediction["status"]
    elif mode == "deferred":
        trigger = PredictionTrigger(prediction["id"], started_at=created_epoch(prediction))

        async def first_event() -> dict[str, Any]:
            async for event in trigger.run():
                return event.payload
            raise RuntimeError("no event")

        status = asyncio.run(first_event())["status"]
    else:
        waiter = PredictionWaitMixin()
        waiter.hook = hook
        waiter.poll_interval = 20.0
        waiter.log = logging.getLogger("prefer_wait")
        status = waiter._wait_in_worker(prediction, None)["status"]
    return prediction["id"], time.monotonic() - started, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="predictions per mode (one at a time)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds every prediction runs")
    parser.add_argument("--prefer-wait", type=int, default=10, help="the N of Prefer: wait=N")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    proc, base_url = start_simulator(args.duration)
    try:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
            os.environ.pop(name, None)
        os.environ["NO_PROXY"] = "127.0.0.1,localhost"
        os.environ["AIRFLOW_CONN_COMETAPI_DEFAULT"] = json.dumps(
            {"conn_type": "cometapi", "password": KEY, "host": base_url}
        )
        modes = [
            ("wait in worker", "worker"),
            ("deferred (trigger)", "deferred"),
            (f"prefer_wait={args.prefer_wait}", "prefer"),
        ]
        rows = []
        for label, mode in modes:
            times, requests, statuses = [], [], []
            for _ in range(args.runs):
                pid, took, status = run_once(mode, args.prefer_wait)
                seen = admin(base_url, "requests", prediction_id=pid)["requests"]
                times.append(took)
                requests.append(len(seen))
                statuses.append(status)
            rows.append((label, statistics.fmean(requests), max(requests), statistics.median(times), max(times),
                         statuses.count("succeeded")))
    finally:
        proc.terminate()
        proc.wait(timeout=20)

    print(f"Prefer: wait on a {args.duration:g} s prediction, {args.runs} predictions per mode, one at a time, "
          "simulator in its own process on loopback.")
    print()
    print("| mode | requests / prediction (mean, max) | end-to-end s (median, max) | succeeded |")
    print("|---|---|---|---|")
    for label, req_mean, req_max, t_med, t_max, ok in rows:
        print(f"| {label} | {req_mean:.1f}, {req_max} | {t_med:.2f}, {t_max:.2f} | {ok}/{args.runs} |")


if __name__ == "__main__":
    main()
