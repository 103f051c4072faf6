"""Variants of the hook for comparisons in the benchmark (patched into the triggerer process only)."""

from __future__ import annotations

import aiohttp

from airflow_comet.hooks.cometapi import CometAPIHook, new_async_session


def use_own_sessions() -> None:
    """The hook before the shared pool: the hook's own session, but one per hook, so per trigger.

    ``aclose`` still works: ``release_session`` closes a session it does not know at once.
    """

    async def _aget_session(self: CometAPIHook) -> aiohttp.ClientSession:
        if self._async_session is None or self._async_session.closed:
            self._async_session = new_async_session(await self.aget_settings())
        return self._async_session

    CometAPIHook._aget_session = _aget_session  # type: ignore[method-assign]


def jitter_first_poll(spread: float = 0.5) -> None:
    """A suggestion measured, not shipped: a trigger picked up after its prediction's first second polls
    within ``spread`` seconds instead of at once, so a batch of late pick-ups does not poll in one burst."""
    import random

    from airflow_comet.polling import PredictionPoller

    original = PredictionPoller.first_delay

    def first_delay(self: PredictionPoller, now: float) -> float:
        delay = original(self, now)
        return delay if delay > 0 else random.uniform(0.0, spread)

    PredictionPoller.first_delay = first_delay  # type: ignore[method-assign]


def grid_wakeups(grid: float = 0.1) -> None:
    """A suggestion measured, not shipped: every poll wakes on a ``grid``-second boundary of the clock, so
    the triggers due within the same tenth of a second share one event-loop wake-up (and their requests
    leave together) instead of each waking the loop on its own."""
    import asyncio
    import math
    import time
    import types

    from airflow_comet.triggers import prediction

    real_sleep = asyncio.sleep

    async def sleep(delay: float, result=None):
        now = time.time()
        return await real_sleep(math.ceil((now + delay) / grid) * grid - now, result)

    prediction.asyncio = types.SimpleNamespace(**{**vars(asyncio), "sleep": sleep})  # type: ignore[attr-defined]
