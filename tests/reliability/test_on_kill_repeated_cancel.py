"""PredictionTrigger.on_kill under the cancellations Airflow 3.3.2's triggerer really sends (no deployment).

When a person marks a deferred task failed, the triggerer cancels the trigger's asyncio task with its
"user action" message and awaits ``on_kill()`` inside the ``except CancelledError`` block
(``TriggerRunner.run_trigger``). Until the trigger has finished, the supervisor keeps the trigger in
``cancelling_triggers`` and sends it back in ``to_cancel`` at every state sync, so the runner calls
``task.cancel(...)`` again about once a second, *while on_kill runs*. Before the fix, the second cancel cut
the cancel request short and scenario 1 found the prediction still running (no cancel at the simulator).

This test drives ``on_kill`` exactly that way (wrapped in ``asyncio.wait_for(..., on_kill_timeout)`` like the
triggerer, re-cancelled every 0.2 s) against the simulator, with a slow task-state lookup and slow answers.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from airflow_comet.triggers.prediction import PredictionTrigger
from tests.test_trigger import create

USER_ACTION = "__airflow_user_action__"  # airflow.jobs.triggerer_job_runner._USER_ACTION_CANCEL_MSG


class _SlowStateTrigger(PredictionTrigger):
    """The task-state lookup takes a while (it is a round trip through the triggerer's supervisor)."""

    state: str | None = "failed"
    lookup_seconds: float = 1.0

    async def _task_state(self) -> str | None:
        await asyncio.sleep(self.lookup_seconds)
        return self.state


async def _run_like_the_triggerer(
    trigger: PredictionTrigger, *, repeat_every: float, on_kill_timeout: float = 30.0
) -> float:
    """A trigger task cancelled with the user-action message, on_kill awaited in the except block, and the
    cancel repeated every ``repeat_every`` s until the task ends; returns the seconds it took.

    (The trigger task may end before on_kill's work does: the event loop, like the triggerer's, goes on.)"""

    async def run_trigger() -> None:
        try:
            await asyncio.sleep(3600)  # the trigger's run(), waiting between polls
        except asyncio.CancelledError as error:
            if error.args and error.args[0] == USER_ACTION:
                try:
                    await asyncio.wait_for(trigger.on_kill(), timeout=on_kill_timeout)
                except asyncio.CancelledError:
                    pass  # what Airflow 3.3.2 does: a cancelled on_kill is swallowed silently
            raise

    task = asyncio.ensure_future(run_trigger())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    while not task.done():
        task.cancel(USER_ACTION)
        await asyncio.wait({task}, timeout=repeat_every)
    with pytest.raises(asyncio.CancelledError):
        task.result()
    return time.monotonic() - started


async def _settle(predicate, limit: float) -> bool:
    """Let the event loop run (on_kill may go on after the trigger task ended) until ``predicate()``."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return bool(predicate())


def _others() -> set[asyncio.Task]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_mark_failed_cancels_despite_repeated_cancels(sim):
    prediction_id = create(sim, durations=120)
    trigger = _SlowStateTrigger(prediction_id)
    await _run_like_the_triggerer(trigger, repeat_every=0.2)
    assert await _settle(lambda: sim.cancels(prediction_id), 10), "on_kill was cut short by the repeated cancel"
    assert len(sim.cancels(prediction_id)) == 1
    assert sim.prediction(prediction_id)["status"] == "canceled"
    assert await _settle(lambda: not _others(), 5), _others()


async def test_stale_triggerer_still_does_not_cancel_under_repeated_cancels(sim):
    prediction_id = create(sim, durations=120)
    trigger = _SlowStateTrigger(prediction_id)
    trigger.state = "deferred"  # the trigger moved to another triggerer
    await _run_like_the_triggerer(trigger, repeat_every=0.2)
    assert await _settle(lambda: not _others(), 5), _others()  # on_kill ran to its end
    assert sim.cancels(prediction_id) == []
    assert sim.prediction(prediction_id)["status"] in ("starting", "processing")


async def test_on_kill_is_bounded_by_its_own_budget(sim, monkeypatch):
    """A state lookup that never answers does not keep on_kill's work alive past the budget."""
    import airflow_comet.triggers.prediction as module

    monkeypatch.setattr(module, "_on_kill_budget", lambda: 1.5)
    prediction_id = create(sim, durations=120)
    trigger = _SlowStateTrigger(prediction_id)
    trigger.lookup_seconds = 3600
    started = time.monotonic()
    await _run_like_the_triggerer(trigger, repeat_every=0.2)
    assert await _settle(lambda: not _others(), 6), _others()
    assert 1.0 < time.monotonic() - started < 6
    assert sim.cancels(prediction_id) == []
