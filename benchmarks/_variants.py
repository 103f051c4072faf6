"""Variants of the hook for comparisons in the benchmark (patched into the triggerer process only)."""

from __future__ import annotations

import aiohttp

from airflow_comet.hooks.cometapi import USER_AGENT, CometAPIHook


def use_own_sessions() -> None:
    """The hook as it was before the shared pool: one aiohttp session (and pool) per hook, so per trigger.

    ``aclose`` still works: ``release_session`` closes a session it does not know at once.
    """

    async def _aget_session(self: CometAPIHook) -> aiohttp.ClientSession:
        if self._async_session is None or self._async_session.closed:
            settings = await self.aget_settings()
            self._async_session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout
                ),
                headers={
                    "Authorization": f"Bearer {settings.api_key}",
                    "User-Agent": USER_AGENT,
                    "Accept": "application/json",
                },
            )
        return self._async_session

    CometAPIHook._aget_session = _aget_session  # type: ignore[method-assign]


def cache_settings() -> None:
    """A suggestion measured, not shipped: resolve each connection once per event loop, not once per trigger.

    ``aget_settings`` asks Airflow for the connection for every new hook (about 0.7 ms of CPU and a thread
    hop in Airflow 3.3); with thousands of triggers starting, that is the largest start-up cost.
    """
    import asyncio

    original = CometAPIHook.aget_settings
    cache: dict[tuple[int, str], object] = {}

    async def aget_settings(self: CometAPIHook):  # type: ignore[no-untyped-def]
        if self._settings is None:
            key = (id(asyncio.get_running_loop()), self.cometapi_conn_id)
            found = cache.get(key)
            if found is None:
                found = cache[key] = await original(self)
            self._settings = found  # type: ignore[assignment]
        return self._settings

    CometAPIHook.aget_settings = aget_settings  # type: ignore[method-assign]


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
