"""The floor of ``benchmarks/real_airflow.py``'s nightly run: the same batch without Airflow, in plain asyncio.

    python -m benchmarks.floor_asyncio --base-url http://127.0.0.1:PORT --api-key KEY \\
        --batch batch.json --folder /tmp/out [--in-flight 64] [--rate 20] [--check-every 1] [--json out.json]

``batch.json`` is ``{"model": "owner/name", "inputs": [{...}, ...]}``. At most ``--in-flight`` predictions run
at once; creates leave at most ``--rate`` a second (evenly spaced); each prediction is checked every
``--check-every`` seconds and its output files are downloaded into ``--folder`` as
``<prediction id>-<index>.<ext>`` as soon as it has succeeded. One aiohttp session, no retries: the
simulator answers every request here, and a failed request is counted, not hidden. Prints (or writes) its
figures as JSON: wall seconds, creates, status requests, downloads, how the predictions ended, errors, and
this process's CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

API_PREFIX = "/replicate/v1"
TERMINAL = ("succeeded", "failed", "canceled", "aborted")


class Pacer:
    """Lets callers through at most ``rate`` a second, evenly spaced, in the order they asked."""

    def __init__(self, rate: float) -> None:
        self.gap = 1.0 / rate
        self.next_at = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self.lock:
            now = time.monotonic()
            if self.next_at > now:
                await asyncio.sleep(self.next_at - now)
            self.next_at = max(now, self.next_at) + self.gap


def _output_urls(output: Any) -> list[str]:
    if output is None:
        return []
    return [output] if isinstance(output, str) else [url for url in output if isinstance(url, str)]


async def run_floor(
    base_url: str,
    api_key: str,
    model: str,
    inputs: list[dict[str, Any]],
    folder: Path,
    *,
    in_flight: int = 64,
    rate: float = 20.0,
    check_every: float = 1.0,
) -> dict[str, Any]:
    """Run every input through ``model`` and save the outputs into ``folder``; the figures."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"creates": 0, "status_requests": 0, "downloads": 0, "errors": 0}
    ended: dict[str, int] = {}
    slots = asyncio.Semaphore(in_flight)
    pacer = Pacer(rate)
    create_url = f"{base_url}{API_PREFIX}/models/{model}/predictions"

    async def one(session: aiohttp.ClientSession, files: aiohttp.ClientSession, item: dict[str, Any]) -> None:
        async with slots:
            await pacer.wait()
            async with session.post(create_url, json={"input": item}) as response:
                response.raise_for_status()
                prediction = await response.json()
            counts["creates"] += 1
            status_url = f"{base_url}{API_PREFIX}/predictions/{prediction['id']}"
            while prediction["status"] not in TERMINAL:
                await asyncio.sleep(check_every)
                async with session.get(status_url) as response:
                    counts["status_requests"] += 1
                    response.raise_for_status()
                    prediction = await response.json()
            ended[prediction["status"]] = ended.get(prediction["status"], 0) + 1
            if prediction["status"] != "succeeded":
                return
            for index, url in enumerate(_output_urls(prediction.get("output"))):
                ext = Path(urlsplit(url).path).suffix or ".bin"
                async with files.get(url) as response:
                    response.raise_for_status()
                    data = await response.read()
                counts["downloads"] += 1
                (folder / f"{prediction['id']}-{index}{ext}").write_bytes(data)

    async def guarded(session: aiohttp.ClientSession, files: aiohttp.ClientSession, item: dict[str, Any]) -> None:
        try:
            await one(session, files, item)
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as error:
            counts["errors"] += 1
            print(f"floor: {type(error).__name__}: {error}", file=sys.stderr)

    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=60)
    headers = {"Authorization": f"Bearer {api_key}"}
    # Downloads in a session of their own: the file host gets no API key, as with the provider.
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session, \
            aiohttp.ClientSession(timeout=timeout) as files:
        await asyncio.gather(*(guarded(session, files, item) for item in inputs))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall_s": time.monotonic() - started,
        **counts,
        "ended": ended,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="the CometAPI (simulator) base URL, on 127.0.0.1")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--batch", type=Path, required=True, help='JSON: {"model": ..., "inputs": [...]}')
    parser.add_argument("--folder", type=Path, required=True, help="where the output files go")
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--rate", type=float, default=20.0, help="creates per second at most")
    parser.add_argument("--check-every", type=float, default=1.0, help="seconds between two checks of a prediction")
    parser.add_argument("--json", type=Path, help="write the figures here instead of printing them")
    args = parser.parse_args()
    if urlsplit(args.base_url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--base-url must be on loopback (a benchmark sends no traffic elsewhere)")
    batch = json.loads(args.batch.read_text())
    figures = asyncio.run(
        run_floor(args.base_url, args.api_key, batch["model"], batch["inputs"], args.folder,
                  in_flight=args.in_flight, rate=args.rate, check_every=args.check_every)
    )
    text = json.dumps(figures, indent=2)
    if args.json:
        args.json.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
