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
