"""The per-connection request budget shared by every trigger of one event loop (hooks/_ratelimit.py).

Budget behaviour is checked on the budget itself (order, pauses, loops) and end to end through many
async hooks against the simulator, which counts requests per wall-clock second.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from airflow_comet.hooks import _per_loop
from airflow_comet.hooks._ratelimit import HEADROOM, PausedTooLong, RequestBudget, request_budget
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.testing import Faults
from tests.conftest import create_running_prediction, set_connection

MODEL = "black-forest-labs/flux-schnell"


async def _poll(hook: CometAPIHook, prediction_id: str, times: int) -> None:
    for _ in range(times):
        await hook.aget_prediction(prediction_id)


# -- end to end: many hooks, one budget --------------------------------------------------------------


def test_concurrent_hooks_stay_within_the_budget_in_every_second(simulator, monkeypatch):
    rate, hooks, polls = 20, 30, 2
    set_connection(monkeypatch, simulator.base_url, max_requests_per_second=rate)
    pid = create_running_prediction()

    async def run() -> float:
        started = time.monotonic()
        clients = [CometAPIHook() for _ in range(hooks)]
        for hook in clients:
            await hook.__aenter__()
        try:
            await asyncio.gather(*(_poll(hook, pid, polls) for hook in clients))
        finally:
            for hook in clients:
                await hook.aclose()
        return time.monotonic() - started

    elapsed = asyncio.run(run())
    polls_seen = simulator.polls(pid)
    assert len(polls_seen) == hooks * polls
    assert all(r.status == 200 for r in polls_seen)
    assert simulator.max_requests_per_second() <= rate
    # The budget really paced them: 60 requests at (1 + HEADROOM) / 20 s apart.
    assert elapsed >= (hooks * polls - 1) * (1 + HEADROOM) / rate * 0.95
    # Evenly spaced, not bursts: the median gap is the budget's spacing (arrival times carry some jitter).
    gaps = sorted(b.time - a.time for a, b in zip(polls_seen, polls_seen[1:]))
    assert gaps[len(gaps) // 2] >= (1 + HEADROOM) / rate * 0.9


def test_no_budget_means_no_waiting(simulator):
    pid = create_running_prediction()

    async def run() -> float:
        started = time.monotonic()
        async with CometAPIHook() as hook:
            await _poll(hook, pid, 20)
        return time.monotonic() - started

    assert asyncio.run(run()) < 2.0
    assert len(simulator.polls(pid)) == 20


def test_a_429_with_retry_after_pauses_every_hook_of_the_connection(simulator):
    pid = create_running_prediction()
    simulator.set_faults(Faults(never_finish=True, rate_limit_429=1, retry_after=1))

    async def run() -> None:
        first = CometAPIHook()
        others = [CometAPIHook() for _ in range(5)]
        async with first:
            budget = request_budget("cometapi_default", None)
            throttled = asyncio.create_task(first.aget_prediction(pid))
            # Start the others only once the first has been told to back off.
            deadline = time.monotonic() + 5
            while budget.paused_for() == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert budget.paused_for() > 0.5
            for hook in others:
                await hook.__aenter__()
            try:
                await asyncio.gather(throttled, *(hook.aget_prediction(pid) for hook in others))
            finally:
                for hook in others:
                    await hook.aclose()

    asyncio.run(run())
    polls = simulator.polls(pid)
    [limited] = [r for r in polls if r.status == 429]
    answered = [r for r in polls if r.status == 200]
    assert len(answered) == 6  # the throttled one (retried) and the five others
    # Nobody sent anything while the pause lasted (Retry-After: 1).
    assert min(r.time for r in answered) - limited.time >= 0.95


def test_hooks_of_other_connections_are_not_paused(simulator, monkeypatch):
    set_connection(monkeypatch, simulator.base_url, conn_id="cometapi_other")
    pid = create_running_prediction()

    async def run() -> float:
        request_budget("cometapi_default", None).pause(30)
        started = time.monotonic()
        async with CometAPIHook("cometapi_other") as hook:
            await hook.aget_prediction(pid)
        return time.monotonic() - started

    assert asyncio.run(run()) < 2.0


def test_a_new_event_loop_gets_a_fresh_budget(simulator, monkeypatch):
    set_connection(monkeypatch, simulator.base_url, max_requests_per_second=5)
    pid = create_running_prediction()
    seen: list[RequestBudget] = []

    async def run(pause: float) -> float:
        started = time.monotonic()
        async with CometAPIHook() as hook:
            await hook.aget_prediction(pid)
            budget = request_budget("cometapi_default", 5)
            seen.append(budget)
            budget.pause(pause)
        return time.monotonic() - started

    # The first loop ends paused for a minute, with its budget's timer state on a now-closed loop.
    assert asyncio.run(run(60)) < 2.0
    assert asyncio.run(run(60)) < 2.0
    assert seen[0] is not seen[1]
    # Budgets of closed loops are dropped when a new one is made.
    asyncio.run(run(0))
    assert all(state.get(("budget", "cometapi_default")) is not seen[0] for _, state in _per_loop._loops.values())


# -- the budget itself ---------------------------------------------------------------------------------


def test_waiters_are_served_first_come_first_served_and_evenly_spaced():
    async def run() -> tuple[list[int], list[float]]:
        budget = RequestBudget(rate=50)
        order: list[int] = []
        times: list[float] = []

        async def one(i: int) -> None:
            await budget.acquire()
            order.append(i)
            times.append(time.monotonic())

        tasks = []
        for i in range(20):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0)  # each asks in turn
        await asyncio.gather(*tasks)
        return order, times

    order, times = asyncio.run(run())
    assert order == list(range(20))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= (1 + HEADROOM) / 50 * 0.75


def test_a_cancelled_waiter_does_not_hold_up_the_queue():
    async def run() -> list[int]:
        budget = RequestBudget(rate=100)
        order: list[int] = []

        async def one(i: int) -> None:
            await budget.acquire()
            order.append(i)

        tasks = [asyncio.create_task(one(i)) for i in range(6)]
        await asyncio.sleep(0)
        tasks[2].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return order

    assert asyncio.run(run()) == [0, 1, 3, 4, 5]


def test_late_comers_queue_behind_waiters_even_when_a_slot_is_free():
    async def run() -> list[str]:
        budget = RequestBudget(rate=20)
        order: list[str] = []

        async def one(name: str) -> None:
            await budget.acquire()
            order.append(name)

        first = [asyncio.create_task(one(f"early{i}")) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.sleep(0.2)  # early0..2 are served; the budget is idle again
        late = [asyncio.create_task(one(f"queued{i}")) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.gather(*first, *late)
        return order

    assert asyncio.run(run()) == ["early0", "early1", "early2", "queued0", "queued1", "queued2"]


def test_an_urgent_request_takes_the_next_slot_ahead_of_the_queue():
    async def run() -> list[str]:
        budget = RequestBudget(rate=20)
        order: list[str] = []

        async def one(name: str, urgent: bool = False) -> None:
            await budget.acquire(urgent=urgent)
            order.append(name)

        queued = [asyncio.create_task(one(f"check{i}")) for i in range(6)]
        await asyncio.sleep(0)  # check0 goes at once, the rest queue for a slot each
        assert budget.waiting == 5
        cancel = asyncio.create_task(one("cancel", urgent=True))
        await asyncio.gather(*queued, cancel)
        return order

    # Ahead of every queued check, but after the one already sent: the rate itself still holds.
    assert asyncio.run(run()) == ["check0", "cancel", "check1", "check2", "check3", "check4", "check5"]


def test_urgent_requests_keep_the_spacing_and_wait_out_a_pause():
    async def run() -> list[float]:
        budget = RequestBudget(rate=20)
        loop = asyncio.get_running_loop()
        start = loop.time()
        released: list[float] = []

        async def one(urgent: bool) -> None:
            await budget.acquire(urgent=urgent)
            released.append(loop.time() - start)

        budget.pause(0.2)
        await asyncio.gather(*(one(urgent=i % 2 == 0) for i in range(4)))
        return released

    released = asyncio.run(run())
    assert min(released) >= 0.19  # a Retry-After pause holds urgent requests too
    # Timed when each task resumes, not when its slot is given: loose, for a loaded machine.
    assert released[-1] - released[0] >= 3 * (1 + HEADROOM) / 20 * 0.7


def test_a_patient_request_gives_up_on_a_longer_pause_and_waits_out_a_shorter_one():
    """A batch's create in its worker (patience 5 s) is not held through a 30 s pause, whether the pause
    began before it asked or while it was queued; a 0.2 s pause it waits out, and the others wait regardless."""

    async def run() -> tuple[list[object], float]:
        budget = RequestBudget(rate=5)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await budget.acquire()  # the first slot: the next ones queue
        queued = [asyncio.ensure_future(budget.acquire(patience=5.0)) for _ in range(2)]
        impatient_never = asyncio.ensure_future(budget.acquire())
        await asyncio.sleep(0)
        budget.pause(0.2)  # shorter than the patience: waited out
        await queued[0]
        budget.pause(30.0)  # longer: the queued patient one gives up, unsent
        outcomes: list[object] = []
        try:
            await queued[1]
        except PausedTooLong as error:
            outcomes.append(round(error.seconds))
        try:
            await budget.acquire(patience=5.0)  # asking during the pause: at once
        except PausedTooLong as error:
            outcomes.append(round(error.seconds))
        outcomes.append(impatient_never.done())
        impatient_never.cancel()
        return outcomes, loop.time() - start

    outcomes, took = asyncio.run(run())
    assert outcomes == [30, 30, False] and took < 2


def test_a_cancel_is_not_stuck_behind_the_queued_status_checks(simulator, monkeypatch):
    """on_kill has about 25 s: at 2 requests a second, a cancel behind 20 queued checks would take 10 s."""
    set_connection(monkeypatch, simulator.base_url, max_requests_per_second=2)
    polled, cancelled = create_running_prediction(), create_running_prediction()

    async def run() -> float:
        hooks = [CometAPIHook() for _ in range(8)]
        for hook in hooks:
            await hook.__aenter__()
        try:
            checks = [asyncio.create_task(hook.aget_prediction(polled)) for hook in hooks]
            await asyncio.sleep(0.1)  # one check sent, seven queued
            started = time.monotonic()
            async with CometAPIHook() as hook:
                await hook.acancel_prediction(cancelled)
            took = time.monotonic() - started
            for check in checks:
                check.cancel()
            await asyncio.gather(*checks, return_exceptions=True)
            return took
        finally:
            for hook in hooks:
                await hook.aclose()

    took = asyncio.run(run())
    assert took < 1.5  # the next slot (0.525 s at 2/s), not the eighth (3.7 s)
    assert len(simulator.polls(polled)) <= 2
    assert simulator.prediction(cancelled)["status"] == "canceled"


def test_pause_holds_everyone_and_without_a_rate_releases_them_together():
    async def run() -> list[float]:
        budget = RequestBudget(rate=None)
        loop = asyncio.get_running_loop()
        start = loop.time()
        budget.pause(0.3)
        budget.pause(0.1)  # a shorter pause never shortens the current one
        released: list[float] = []

        async def one() -> None:
            await budget.acquire()
            released.append(loop.time() - start)

        await asyncio.gather(*(one() for _ in range(10)))
        return released

    released = asyncio.run(run())
    assert min(released) >= 0.29
    assert max(released) - min(released) < 0.05


def test_pause_during_spaced_release_pushes_the_queue_back():
    async def run() -> list[float]:
        budget = RequestBudget(rate=20)
        loop = asyncio.get_running_loop()
        start = loop.time()
        released: list[float] = []

        async def one() -> None:
            await budget.acquire()
            released.append(loop.time() - start)

        tasks = [asyncio.create_task(one()) for _ in range(4)]
        await asyncio.sleep(0.07)  # two served (t=0, t=0.0525)
        budget.pause(0.5)
        await asyncio.gather(*tasks)
        return released

    released = asyncio.run(run())
    assert released[1] < 0.07
    assert released[2] >= 0.56
    assert released[3] - released[2] >= (1 + HEADROOM) / 20 * 0.9


def test_rate_follows_the_connection():
    async def run() -> tuple[RequestBudget, RequestBudget]:
        return request_budget("conn_a", 10), request_budget("conn_a", 25)

    first, second = asyncio.run(run())
    assert first is second
    assert second.rate == 25


def test_rate_must_be_positive():
    with pytest.raises(ValueError):
        RequestBudget(rate=0)
