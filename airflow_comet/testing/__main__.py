"""Run the simulator as a process: ``python -m airflow_comet.testing --port 8765``.

Prints one line with the URLs (flushed, so a parent process can wait for it) and serves until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from airflow_comet.testing.faults import Faults
from airflow_comet.testing.simulator import CometAPISimulator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m airflow_comet.testing", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="only 127.0.0.1/localhost are accepted")
    parser.add_argument("--port", type=int, default=8765, help="API port (0 = any free port); default 8765")
    parser.add_argument("--delivery-port", type=int, default=0, help="file-delivery port (default: any free port)")
    parser.add_argument("--api-key", default="sim-key", help="the bearer key clients must send (default sim-key)")
    parser.add_argument("--seed", type=int, default=0, help="seed for durations and rate-based faults")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="fraction of predictions that end failed")
    parser.add_argument(
        "--duration", type=float, nargs=2, metavar=("MIN", "MAX"), help="run time of every model, uniform in seconds"
    )
    parser.add_argument("--faults", metavar="JSON", help="full Faults as JSON (same fields as POST /_simulator/faults)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fields = json.loads(args.faults) if args.faults else {}
    if args.fail_rate:
        fields["fail_rate"] = args.fail_rate
    if args.duration:
        fields["durations"] = tuple(args.duration)
    try:
        faults = Faults.from_dict(fields)
        sim = CometAPISimulator(
            args.api_key,
            host=args.host,
            port=args.port,
            delivery_port=args.delivery_port,
            faults=faults,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    with sim:
        print(f"CometAPI simulator listening on {sim.base_url} (delivery {sim.delivery_url})", flush=True)
        # Event.wait with a timeout in a loop: the main thread stays interruptible by signals.
        while not done.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
