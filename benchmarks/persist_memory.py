"""Peak memory of persisting a large output file, next to a naive ``requests.get(url).content``.

    python benchmarks/persist_memory.py [--size-mb 200]

The CometAPI simulator runs in its own process (so its buffers are not counted) and serves the output
file at the requested size. Each measurement runs in a fresh Python process that first imports
everything and does a small warm-up download, then reports how far its peak RSS grew during the measured
step (Linux: VmHWM reset through /proc/self/clear_refs; elsewhere ``resource.getrusage`` ru_maxrss) and the
peak of Python allocations (``tracemalloc``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Any

import requests

API_KEY = "bench-key"
SMALL_MODEL = "black-forest-labs/flux-schnell"  # served at its natural size: the warm-up
LARGE_MODEL = "black-forest-labs/flux-dev"  # served at --size-mb: the measurement
MIB = 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200, help="size of the output file in MiB (default 200)")
    parser.add_argument("--phase", choices=["persist", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--small", help=argparse.SUPPRESS)
    parser.add_argument("--large", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(measure(args.phase, json.loads(args.small), json.loads(args.large))))
        return 0
    return orchestrate(args.size_mb * MIB)


# -- parent: simulator, predictions, one child process per measurement ----------------------------------------


def orchestrate(size: int) -> int:
    faults = {"durations": 0.2, "per_model": {LARGE_MODEL: {"durations": 0.2, "file_size_bytes": size}}}
    sim = subprocess.Popen(
        [sys.executable, "-m", "airflow_comet.testing", "--port", "0", "--api-key", API_KEY]
        + ["--faults", json.dumps(faults)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = sim.stdout.readline()  # "CometAPI simulator listening on http://127.0.0.1:N (delivery ...)"
        base_url = line.split(" on ", 1)[1].split()[0]
        small = finished_prediction(base_url, SMALL_MODEL)
        large = finished_prediction(base_url, LARGE_MODEL)
        # The children's persist step downloads from the simulator's loopback delivery host, which output
        # downloads reach only when the CometAPI connection is loopback too (docs/security.md).
        os.environ["AIRFLOW_CONN_COMETAPI_DEFAULT"] = json.dumps(
            {"conn_type": "cometapi", "password": API_KEY, "host": base_url}
        )
        results = [run_child(phase, small, large) for phase in ("persist", "naive")]
    finally:
        sim.terminate()
        sim.wait(timeout=10)

    print(f"Output file: {size / MIB:.0f} MiB from the simulator's delivery host (loopback)")
    print(f"{'method':<44} {'peak RSS growth':>16} {'tracemalloc peak':>17} {'time':>8}   RSS before -> peak")
    for result in results:
        print(
            f"{result['label']:<44} {result['rss_growth'] / MIB:>12.1f} MiB {result['traced_peak'] / MIB:>13.1f} MiB"
            f" {result['seconds']:>7.2f}s   {result['rss_before'] / MIB:.1f} -> {result['rss_peak'] / MIB:.1f} MiB"
            f" ({result['method']})"
        )
    persist, naive = results
    print(f"PersistPredictionOutputOperator wrote {persist['size'] / MIB:.0f} MiB, sha256 {persist['sha256'][:16]}...")
    if not persist["size"] == naive["size"] == size:
        print(f"error: expected {size} bytes from both methods, got {persist['size']} and {naive['size']}")
        return 1
    return 0


def finished_prediction(base_url: str, model: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    created = requests.post(
        f"{base_url}/replicate/v1/models/{model}/predictions",
        json={"input": {"prompt": "memory benchmark", "output_format": "png"}},
        headers=headers,
        timeout=10,
    ).json()
    deadline = time.monotonic() + 30
    while True:
        url = f"{base_url}/replicate/v1/predictions/{created['id']}"
        prediction = requests.get(url, headers=headers, timeout=10).json()
        if prediction["status"] == "succeeded":
            return prediction
        if time.monotonic() > deadline or prediction["status"] in ("failed", "canceled"):
            raise RuntimeError(f"prediction {created['id']} ended {prediction['status']}")
        time.sleep(0.1)


def run_child(phase: str, small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", phase, "--small", json.dumps(small), "--large", json.dumps(large)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- child: one measurement in a fresh process ------------------------------------------------------------


def measure(phase: str, small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    import logging

    logging.disable(logging.WARNING)  # keep the child's output for the JSON result
    folder = tempfile.mkdtemp(prefix="persist-memory-")
    try:
        step = _persist_step(folder) if phase == "persist" else _naive_step
        step(small)  # warm-up: imports, first connection, code paths
        before, method = _start_peak_window()
        tracemalloc.start()
        started = time.perf_counter()
        result = step(large)
        seconds = time.perf_counter() - started
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peak = _peak_rss() if method == "VmHWM" else _ru_maxrss()
        result.update(
            rss_before=before,
            rss_peak=peak,
            rss_growth=peak - before,
            method=method,
            traced_peak=traced_peak,
            seconds=seconds,
        )
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _persist_step(folder: str) -> Any:
    from airflow_comet.operators.persist import PersistPredictionOutputOperator

    def step(prediction: dict[str, Any]) -> dict[str, Any]:
        operator = PersistPredictionOutputOperator(
            task_id="persist", prediction=prediction, destination=f"file://{folder}/"
        )
        [record] = operator.execute({})
        label = "PersistPredictionOutputOperator (streamed)"
        return {"label": label, "size": record["size"], "sha256": record["sha256"]}

    return step


def _naive_step(prediction: dict[str, Any]) -> dict[str, Any]:
    content = requests.get(prediction["output"][0], timeout=60).content
    return {"label": "requests.get(url).content (naive baseline)", "size": len(content), "sha256": ""}


def _start_peak_window() -> tuple[int, str]:
    """Start measuring: returns the RSS the growth is counted from.

    On Linux the kernel's peak (VmHWM) is reset to the current RSS, so an earlier transient peak (from
    imports, say) cannot hide growth. Elsewhere the peak so far (``ru_maxrss``) is the baseline, which can
    only under-report."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        if _proc_status("VmHWM") <= _proc_status("VmRSS") + 64 * 1024:  # the reset took effect
            return _proc_status("VmRSS"), "VmHWM"
    except OSError:
        pass
    return _ru_maxrss(), "ru_maxrss"


def _peak_rss() -> int:
    return _proc_status("VmHWM")


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError(f"{field} not in /proc/self/status")


def _ru_maxrss() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    sys.exit(main())
