"""Pieces the benchmark scripts share: this process's CPU time, and triggers left waiting in the running loop
the way a triggerer runs them."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Sequence
from typing import Any

try:  # imported now, not at the first trigger: a measurement of objects must not count the module's
    import greenback
except ImportError:  # Airflow 2
    greenback = None


def cpu_seconds() -> float:
    """User plus system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_waiting(triggers: Sequence[Any], spread: float) -> list[asyncio.Task[None]]:
    """Run each trigger until its first event, in tasks of the running loop, their starts spread evenly over
    ``spread`` seconds (as a triggerer picks a batch up), each with greenback's portal as Airflow 3's
    triggerer gives it (where greenback is installed)."""
    async def run(trigger: Any, delay: float) -> None:
        await asyncio.sleep(delay)
        if greenback is not None:
            await greenback.ensure_portal()
        async for _ in trigger.run():
            break

    return [asyncio.create_task(run(t, spread * i / len(triggers))) for i, t in enumerate(triggers)]
