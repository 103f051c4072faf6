"""CPU per status request in a tight loop: bare aiohttp against ``CometAPIHook.aget_prediction``.

    .venv/airflow-3.3/bin/python benchmarks/per_request.py       # about 20 s

16 concurrent pollers ask for one running prediction over and over (3,000 requests per side and round,
three rounds, the best round printed), against the simulator in its own process. This is the cost of a
request when many are in flight at once; in a triggerer each poll is a wake-up of its own, which costs
more (``triggers.py`` measures that, and RESULTS.md compares the two).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from benchmarks._measure import cpu_seconds  # noqa: E402
from benchmarks._sim import SimProcess  # noqa: E402

KEY = "per-request-key"
REQUESTS, POLLERS, ROUNDS = 3000, 16, 3


async def main() -> None:
    sim = await SimProcess(KEY, {"durations": {"black-forest-labs/flux-schnell": [900, 900]}}).start()
    try:
        os.environ.update(sim.connection_env())
        [prediction_id] = await sim.create_predictions(1)
        headers = {"Authorization": f"Bearer {KEY}"}
        from airflow_comet.hooks.cometapi import CometAPIHook

        status_url = f"{sim.base_url}/replicate/v1/predictions/{prediction_id}"
        per_request: dict[str, list[float]] = {"bare aiohttp": [], "CometAPIHook": []}
        for _ in range(ROUNDS):
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(headers=headers, connector=connector) as session:

                async def bare() -> None:
                    for _ in range(REQUESTS // POLLERS):
                        async with session.get(status_url) as response:
                            json.loads(await response.read())

                await bare()  # warm the pool
                start = cpu_seconds()
                await asyncio.gather(*(bare() for _ in range(POLLERS)))
                per_request["bare aiohttp"].append((cpu_seconds() - start) / REQUESTS)
            hooks = [CometAPIHook("cb") for _ in range(POLLERS)]
            for hook in hooks:
                await hook.__aenter__()

            async def through(hook: CometAPIHook) -> None:
                for _ in range(REQUESTS // POLLERS):
                    await hook.aget_prediction(prediction_id)

            start = cpu_seconds()
            await asyncio.gather(*(through(hook) for hook in hooks))
            per_request["CometAPIHook"].append((cpu_seconds() - start) / REQUESTS)
            for hook in hooks:
                await hook.__aexit__(None, None, None)
        for name, values in per_request.items():
            rounds = ", ".join(f"{v * 1e6:.0f}" for v in values)
            print(f"{name}: {min(values) * 1e6:.0f} us of CPU per request (rounds: {rounds})")
    finally:
        await sim.stop()


if __name__ == "__main__":
    asyncio.run(main())
