"""Variants of PredictionTrigger for comparisons in the benchmark (patched into the triggerer process only)."""

from __future__ import annotations


def own_loop() -> None:
    """``PredictionTrigger.run`` before the shared poller: each trigger sleeps and polls on its own, through
    its own hook (still on the connection's shared session and budget), and wakes for every status check."""
    import asyncio
    import time

    from airflow.triggers.base import TriggerEvent

    from airflow_comet.exceptions import CometAPIError
    from airflow_comet.polling import PredictionPoller
    from airflow_comet.triggers.prediction import PredictionTrigger

    async def run(self: PredictionTrigger):  # type: ignore[no-untyped-def]
        poller = PredictionPoller(self.prediction_id, self.started_at, self.end_time, self.poll_interval)
        async with self._hook() as hook:
            delay = poller.first_delay(time.time())
            while True:
                await asyncio.sleep(delay)
                try:
                    prediction = await hook.aget_prediction(self.prediction_id)
                except CometAPIError as error:
                    outcome = poller.on_error(error, time.time())
                else:
                    outcome = poller.on_prediction(prediction, time.time())
                if outcome.event is not None:
                    self.log.info("%s (%d status checks)", outcome.event["message"], poller.polls)
                    yield TriggerEvent(outcome.event)
                    return
                if outcome.new_status:  # DEBUG, as the shipped trigger logs them (since 3dd3cc1; INFO before)
                    self.log.debug("Prediction %s is %s", self.prediction_id, outcome.new_status)
                delay = outcome.delay

    PredictionTrigger.run = run  # type: ignore[method-assign]


def jitter_first_poll(spread: float = 0.5) -> None:
    """A suggestion measured, not shipped: a trigger picked up after its first check was due polls
    within ``spread`` seconds instead of at once, so a batch of late pick-ups does not poll in one burst."""
    import random

    from airflow_comet.polling import PredictionPoller

    original = PredictionPoller.first_delay

    def first_delay(self: PredictionPoller, now: float) -> float:
        delay = original(self, now)
        return delay if delay > 0 else random.uniform(0.0, spread)

    PredictionPoller.first_delay = first_delay  # type: ignore[method-assign]


def wide_batches(checks_per_worker: int = 16, slack: float = 0.05) -> None:
    """A suggestion measured: more checks per worker and a coarser timer (fewer, larger batches)."""
    from airflow_comet.triggers import _shared_poller

    _shared_poller.CHECKS_PER_WORKER = checks_per_worker
    _shared_poller.SLACK = slack


def narrow_batches() -> None:
    """A suggestion measured: one check per worker and a fine timer (the other direction)."""
    wide_batches(checks_per_worker=1, slack=0.005)


def untimed_batches() -> None:
    """The shared poller's batching before due times were rounded to ticks (until 2026-12-06): each check at
    its own due time, those due within 25 ms of a wake-up taken with it, four per worker, sent back to back.
    Hooks are still handed from worker to worker, as since then (the measured "before" ran without that)."""
    from airflow_comet.triggers import _shared_poller

    _shared_poller.TICK = 1e-6
    wide_batches(checks_per_worker=4, slack=0.025)

