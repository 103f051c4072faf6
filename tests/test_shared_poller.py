"""The shared poller: every PredictionTrigger of a connection in one event loop, checked by one timer and a
few workers (triggers/_shared_poller.py), against the simulator."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import Counter

import pytest

from airflow_comet.hooks._per_loop import loop_state
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet import polling
from airflow_comet.polling import PredictionPoller
from airflow_comet.testing import Faults
from airflow_comet.triggers import _shared_poller
from airflow_comet.triggers._shared_poller import shared_poller
from airflow_comet.triggers.prediction import PredictionTrigger
from tests.conftest import set_connection

MODEL = "black-forest-labs/flux-schnell"


def create(count: int = 1) -> list[str]:
    hook = CometAPIHook()
    return [hook.create_prediction(MODEL, {"prompt": f"boat {i}"})["id"] for i in range(count)]


async def first_event(trigger: PredictionTrigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("run() ended without an event")


def answer_slowly_for(monkeypatch: pytest.MonkeyPatch, prediction_id: str, seconds: float) -> None:
    """Status checks of ``prediction_id`` take ``seconds`` longer to answer (the request itself stays real)."""
    original = CometAPIHook.aget_prediction

    async def slow_for_one(self, pid):
        if pid == prediction_id:
            await asyncio.sleep(seconds)
        return await original(self, pid)

    monkeypatch.setattr(CometAPIHook, "aget_prediction", slow_for_one)


def break_request_for(monkeypatch: pytest.MonkeyPatch, prediction_id: str) -> str:
    """Its status check raises something that is not an API error; returns the message."""
    original = CometAPIHook.aget_prediction

    async def failing_for_one(self, pid):
        if pid == prediction_id:
            raise RuntimeError("parser exploded")
        return await original(self, pid)

    monkeypatch.setattr(CometAPIHook, "aget_prediction", failing_for_one)
    return "parser exploded"


def break_decision_for(monkeypatch: pytest.MonkeyPatch, prediction_id: str) -> str:
    """The decision on its answer raises (an error in the poller itself); returns the message."""
    original = PredictionPoller.on_prediction

    def exploding_for_one(self, prediction, now):
        if self.prediction_id == prediction_id:
            raise KeyError("surprise")
        return original(self, prediction, now)

    monkeypatch.setattr(PredictionPoller, "on_prediction", exploding_for_one)
    return "surprise"


async def test_many_triggers_share_workers_and_wake_only_to_report(sim):
    # Checks at about 1.7, 3.4, 5.1 and 6.8 s: at least four for each (the third can never see the end).
    sim.set_faults(Faults(durations=(7.0, 7.5)))
    ids = create(40)
    poller = None
    told: list[int] = []
    original = _shared_poller.Watch.next_outcome

    async def counting(self):
        told.append(1)
        return await original(self)

    _shared_poller.Watch.next_outcome = counting  # counted, not replaced: real checks, real answers
    try:
        tasks = [asyncio.ensure_future(first_event(PredictionTrigger(pid))) for pid in ids]
        poller = shared_poller("cometapi_default")
        while poller.following < 40:  # each trigger looks its connection up first
            await asyncio.sleep(0.01)
        events = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        _shared_poller.Watch.next_outcome = original
    assert [e["status"] for e in events] == ["succeeded"] * 40
    assert [e["prediction_id"] for e in events] == ids
    polls = sum(len(sim.polls(pid)) for pid in ids)
    # Each trigger's task woke for what it logs (its first status and a change) and its end, not for every check.
    assert polls >= 4 * 40
    assert 40 <= len(told) <= 3 * 40
    # Everything let go: nothing followed, no worker or other task left, the pool closed with its last user.
    await asyncio.sleep(0.1)
    assert poller.following == 0 and poller.in_flight == 0
    assert not poller._tasks
    assert not [k for k in loop_state() if k[0] == "session"]  # the session closed with its last user
    # At most one connection per check in flight (40 due together), plus the creates' own, kept alive and
    # reused round after round: far fewer opened than checks made.
    assert sim.connections_opened("api") <= 1 + 40


async def test_a_cancelled_trigger_is_no_longer_checked_and_others_go_on(sim):
    sim.set_faults(Faults(durations=(2.5, 2.5)))
    stopped, kept = create(2)
    stopped_task = asyncio.ensure_future(first_event(PredictionTrigger(stopped)))
    kept_task = asyncio.ensure_future(first_event(PredictionTrigger(kept)))
    while not sim.polls(stopped):
        await asyncio.sleep(0.05)
    stopped_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopped_task
    checks = len(sim.polls(stopped))
    event = await asyncio.wait_for(kept_task, 20)
    assert event["status"] == "succeeded"
    await asyncio.sleep(2.5)  # longer than a young prediction's gap between checks (1.7 s +- 10 %)
    assert len(sim.polls(stopped)) == checks  # not one check after the cancel
    assert shared_poller("cometapi_default").following == 0


@pytest.mark.parametrize("break_for", [break_request_for, break_decision_for], ids=["request", "decision"])
async def test_an_unexpected_error_ends_only_its_own_wait_instead_of_hanging_it(sim, monkeypatch, break_for):
    broken, healthy = create(2)
    message = break_for(monkeypatch, broken)
    bad, good = await asyncio.wait_for(
        asyncio.gather(first_event(PredictionTrigger(broken)), first_event(PredictionTrigger(healthy))), 20
    )
    assert bad["status"] == "error" and message in bad["message"]
    assert good["status"] == "succeeded"


async def test_one_slow_answer_does_not_hold_back_the_checks_queued_behind_it(sim, monkeypatch):
    sim.set_faults(Faults(never_finish=True))
    slow, *others = create(3)
    answer_slowly_for(monkeypatch, slow, 5)
    poller = shared_poller("cometapi_default")
    now = time.time()
    # Due within the same batch, the slow one first (10 ms sooner): one worker takes all three in turn
    # unless the backlog behind the slow answer is noticed.
    watches = [
        poller.follow(pid, now - (0.01 if pid == slow else 0.0), poll_interval=5)
        for pid in (slow, *others)
    ]
    try:
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(w.next_outcome() for w in watches[1:])), 10)
        first = polling.FIRST_POLL_DELAY + _shared_poller.TICK / 2
        assert time.monotonic() - started < first + 2 * _shared_poller.BACKLOG_GRACE + 0.5
        assert sim.polls(slow) == []  # still waiting for its answer
    finally:
        for watch in watches:
            watch.close()


async def test_failed_checks_are_told_to_the_trigger_and_retried_on_its_schedule(sim):
    sim.set_faults(Faults(durations=3.0))
    [pid] = create()
    sim.set_faults(Faults(durations=3.0, poll_5xx_rate=1.0, poll_5xx_codes=(503,)))
    watch = shared_poller("cometapi_default").follow(pid, time.time(), poll_interval=5)
    try:
        outcome = await asyncio.wait_for(watch.next_outcome(), 10)
        assert outcome.event is None and "503" in (outcome.problem or "")
        # Sent once, not retried by the hook: the prediction's schedule (which backs off) retries it.
        assert [r.status for r in sim.polls(pid)] == [503]
        sim.set_faults(Faults(durations=3.0))
        while (outcome := await asyncio.wait_for(watch.next_outcome(), 10)).event is None:
            pass
        assert outcome.event["status"] == "succeeded"
    finally:
        watch.close()


async def test_a_watch_hears_status_changes_only_when_its_trigger_would_log_them(sim):
    # Both predictions go processing, then succeeded; the quiet watch's trigger wakes once, for the end.
    sim.set_faults(Faults(durations=3.0))
    told, quiet = create(2)
    poller = shared_poller("cometapi_default")
    now = time.time()
    watches = {
        pid: poller.follow(pid, now, poll_interval=5, tell_changes=pid == told)
        for pid in (told, quiet)
    }
    heard: dict[str, list] = {told: [], quiet: []}
    try:
        for pid, watch in watches.items():
            while (outcome := await asyncio.wait_for(watch.next_outcome(), 15)).event is None:
                heard[pid].append(outcome.new_status)
            heard[pid].append(outcome.event["status"])
    finally:
        for watch in watches.values():
            watch.close()
    assert heard[told] == ["processing", "succeeded"]
    assert heard[quiet] == ["succeeded"]
    assert len(sim.polls(quiet)) >= 2  # checked as often as the other: only the telling differs


async def test_a_failed_connection_lookup_mid_wait_does_not_end_the_wait(sim, monkeypatch):
    from airflow_comet.hooks import _settings_cache

    sim.set_faults(Faults(durations=(4.0, 4.0)))
    [pid] = create()
    task = asyncio.ensure_future(first_event(PredictionTrigger(pid)))
    while not sim.polls(pid):
        await asyncio.sleep(0.05)

    async def api_server_restarting(self):
        raise RuntimeError("connection refused by the API server")

    # From now on every lookup fails (as while Airflow's API server restarts), and nothing is kept.
    monkeypatch.setattr(CometAPIHook, "_alook_up_settings", api_server_restarting)
    _settings_cache.forget_settings("cometapi_default")
    event = await asyncio.wait_for(task, 20)
    assert event["status"] == "succeeded"
    assert len(sim.polls(pid)) >= 2  # checked on with the last good settings


async def test_a_failed_connection_lookup_at_the_start_does_not_end_the_wait(sim, monkeypatch):
    from airflow.providers.common.compat.sdk import AirflowNotFoundException

    from airflow_comet.hooks import _settings_cache
    from airflow_comet.triggers import prediction

    monkeypatch.setattr(prediction, "LOOKUP_PAUSES", (0.2, 0.2, 0.2))
    sim.set_faults(Faults(durations=(2.0, 2.0)))
    [pid] = create()
    real = CometAPIHook._alook_up_settings
    failures = []

    async def api_server_restarting_for_a_moment(self):
        # What Airflow raises when its secrets backend or API server cannot answer (both 2.11 and 3.3 log the
        # cause and report the connection as not found): twice, then the lookups work again.
        if len(failures) < 2:
            failures.append(1)
            raise AirflowNotFoundException(f"The conn_id `{self.cometapi_conn_id}` isn't defined")
        return await real(self)

    monkeypatch.setattr(CometAPIHook, "_alook_up_settings", api_server_restarting_for_a_moment)
    _settings_cache.forget_settings("cometapi_default")
    event = await asyncio.wait_for(first_event(PredictionTrigger(pid)), 20)
    assert event["status"] == "succeeded"
    assert failures == [1, 1]


async def test_a_check_queued_long_past_its_deadline_times_out_without_a_request(sim, monkeypatch):
    monkeypatch.setattr(_shared_poller, "MAX_WORKERS", 1)
    sim.set_faults(Faults(never_finish=True))
    slow, late = create(2)
    answer_slowly_for(monkeypatch, slow, _shared_poller.BACKLOG_GRACE + 7)
    now = time.time()
    poller = shared_poller("cometapi_default")
    watches = [
        # The slow one's first check comes well before the late one's (at its deadline, 1.5 s).
        poller.follow(slow, now - polling.FIRST_POLL_DELAY + 0.5, poll_interval=5),
        poller.follow(late, now, end_time=now + 1.5, poll_interval=5),
    ]
    try:
        outcome = await asyncio.wait_for(watches[1].next_outcome(), 20)
        assert outcome.event["status"] == "timeout"
        assert sim.polls(late) == []  # its deadline had passed by 5 s and more when a worker got to it
    finally:
        for watch in watches:
            watch.close()


async def test_checks_do_not_run_in_a_triggers_context(sim, monkeypatch):
    # Airflow routes a trigger's log lines by context variables: a check must not carry the context of
    # whichever trigger happened to start the workers.
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="none")
    seen: list[str] = []
    original = CometAPIHook.aget_prediction

    async def recording(self, prediction_id):
        seen.append(marker.get())
        return await original(self, prediction_id)

    monkeypatch.setattr(CometAPIHook, "aget_prediction", recording)
    [pid] = create()

    async def as_trigger() -> dict:
        marker.set("trigger A")
        return await first_event(PredictionTrigger(pid))

    event = await asyncio.wait_for(asyncio.ensure_future(as_trigger()), 20)
    assert event["status"] == "succeeded"
    assert seen and set(seen) == {"none"}


async def test_workers_are_capped(sim, monkeypatch):
    monkeypatch.setattr(_shared_poller, "MAX_WORKERS", 2)
    monkeypatch.setattr(_shared_poller, "CHECKS_PER_WORKER", 1)
    sim.set_faults(Faults(durations=(1.0, 2.0), slow_status_seconds=0.1))
    ids = create(12)
    tasks = [asyncio.ensure_future(first_event(PredictionTrigger(pid))) for pid in ids]
    await asyncio.sleep(0)
    poller = shared_poller("cometapi_default")
    most = 0
    while not all(t.done() for t in tasks):
        most = max(most, poller.in_flight)
        await asyncio.sleep(0.01)
    assert [t.result()["status"] for t in tasks] == ["succeeded"] * 12
    assert most == 2


async def test_checks_due_close_together_share_one_timer_wake_up(sim):
    sim.set_faults(Faults(never_finish=True))
    ids = create(10)
    poller = shared_poller("cometapi_default")
    fired: list[float] = []
    original = poller._on_timer

    def counting() -> None:
        fired.append(time.monotonic())
        original()

    poller._on_timer = counting  # counted, not replaced
    now = time.time()
    # Due 2 ms apart: ten timers for ten sleeping triggers, one for the shared poller.
    watches = [
        poller.follow(pid, now + i * 0.002, poll_interval=5) for i, pid in enumerate(ids)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(w.next_outcome() for w in watches)), 10)
        assert len(fired) == 1
        assert all(len(sim.polls(pid)) == 1 for pid in ids)
    finally:
        for watch in watches:
            watch.close()


async def test_checks_sent_early_with_a_batch_keep_their_own_cadence(sim, monkeypatch):
    # Twenty predictions whose first checks fall due spread over a second, polled every 0.6 s (the schedule
    # shortened for the test), due times rounded to 0.3 s ticks: each check moves by up to 0.15 s. Rounded
    # always one way, gaps would shrink (or grow) by half a tick on average; to the nearest tick, the
    # count of checks is the schedule's own.
    monkeypatch.setattr(_shared_poller, "TICK", 0.3)
    monkeypatch.setattr(polling, "YOUNG_GAP", 0.6)
    sim.set_faults(Faults(never_finish=True))
    ids = create(20)
    poller = shared_poller("cometapi_default")
    now = time.time()
    first_delays = [0.05 * i for i in range(20)]
    watches = [
        poller.follow(pid, now - polling.FIRST_POLL_DELAY + delay, poll_interval=5)
        for pid, delay in zip(ids, first_delays)
    ]
    seconds = 6.0
    try:
        await asyncio.sleep(seconds)
    finally:
        for watch in watches:
            watch.close()
    polls = sum(len(sim.polls(pid)) for pid in ids)
    on_schedule = sum(1 + (seconds - delay) / 0.6 for delay in first_delays)
    assert on_schedule * 0.88 <= polls <= on_schedule * 1.08, (polls, on_schedule)


def test_a_new_event_loop_gets_a_new_poller(sim):
    [pid] = create()

    async def one() -> tuple[object, str]:
        event = await first_event(PredictionTrigger(pid))
        return shared_poller("cometapi_default"), event["status"]

    first, status_1 = asyncio.run(one())
    second, status_2 = asyncio.run(one())
    assert first is not second
    assert status_1 == status_2 == "succeeded"


async def test_each_connection_has_its_own_poller(sim, monkeypatch):
    set_connection(monkeypatch, sim.base_url, conn_id="cometapi_other")
    [pid] = create()
    a, b = await asyncio.wait_for(
        asyncio.gather(
            first_event(PredictionTrigger(pid)), first_event(PredictionTrigger(pid, cometapi_conn_id="cometapi_other"))
        ),
        20,
    )
    assert a["status"] == b["status"] == "succeeded"
    assert shared_poller("cometapi_default") is not shared_poller("cometapi_other")


async def test_triggers_stay_within_the_connection_budget(sim, monkeypatch):
    rate = 10
    set_connection(monkeypatch, sim.base_url, max_requests_per_second=rate)
    sim.set_faults(Faults(durations=(1.0, 2.0)))
    ids = create(30)
    events = await asyncio.wait_for(asyncio.gather(*(first_event(PredictionTrigger(pid)) for pid in ids)), 60)
    assert [e["status"] for e in events] == ["succeeded"] * 30
    polls = [r for pid in ids for r in sim.polls(pid)]
    assert len(polls) >= 30
    # Counted over the status checks only (the creates above came from this test, not from the triggers).
    per_second = Counter(int(r.time) for r in polls)
    assert max(per_second.values()) <= rate


@pytest.mark.parametrize("offset", [0.0, 0.1, 0.2])
async def test_a_deadline_between_ticks_costs_no_extra_check(sim, offset):
    # Due times are rounded to ticks, but never a short wait for a deadline: rounded to just before the
    # deadline, the next check would come again and again until it passed.
    sim.set_faults(Faults(never_finish=True))
    [pid] = create()
    deadline = time.time() + 2.0 + offset
    started = time.time()
    event = await asyncio.wait_for(first_event(PredictionTrigger(pid, started_at=started, end_time=deadline)), 10)
    assert event["status"] == "timeout"
    assert abs(time.time() - deadline) < _shared_poller.TICK
    assert len(sim.polls(pid)) == 2  # at about 1.7 s and at the deadline (the wait for it is not rounded)


async def test_hooks_are_handed_on_until_their_settings_expire_and_keep_the_connections(sim, monkeypatch):
    # Settings kept 0.6 s (30 s in a triggerer): over 4 s they expire several times. Workers hand their hooks
    # on until then, the checks follow an edited connection after that, and the pool's keep-alive connections
    # outlive each turnover (a new hook takes its share before the expired ones let go).
    from airflow_comet.hooks import _settings_cache

    monkeypatch.setattr(_settings_cache, "SETTINGS_TTL", 0.6)
    monkeypatch.setattr(polling, "YOUNG_GAP", 0.4)
    sim.set_faults(Faults(never_finish=True))
    ids = create(5)
    opened_before = sim.connections_opened("api")
    lookups = []
    real = CometAPIHook._alook_up_settings

    async def counted(self):
        lookups.append(time.monotonic())
        return await real(self)

    monkeypatch.setattr(CometAPIHook, "_alook_up_settings", counted)
    poller = shared_poller("cometapi_default")
    now = time.time()
    watches = [
        poller.follow(pid, now - polling.FIRST_POLL_DELAY, poll_interval=5) for pid in ids
    ]
    try:
        await asyncio.sleep(3.0)
        checks_before_edit = sum(len(sim.polls(pid)) for pid in ids)
        opened_before_edit = sim.connections_opened("api") - opened_before
        set_connection(monkeypatch, sim.base_url, key="rotated-but-wrong")
        edited = time.time()
        await asyncio.sleep(1.5)
    finally:
        for watch in watches:
            watch.close()
    assert checks_before_edit >= 5 * 6
    assert 3 <= len(lookups) <= 12  # once per expiry, not once per check
    assert opened_before_edit <= 5 + 1  # one per check in flight, kept through the turnovers
    # The edited connection (a wrong key: 401) reached the checks within the settings' lifetime (and the
    # young gap and a tick after it); none was answered with the old key after that.
    after = [r for pid in ids for r in sim.polls(pid) if r.time > edited]
    refused = [r.time for r in after if r.status == 401]
    assert refused and min(refused) - edited < 0.6 + 0.4 + 0.3
    assert all(r.status == 401 for r in after if r.time > edited + 0.7)


async def test_a_watch_keeps_what_it_hears_in_order_while_its_trigger_is_not_waiting():
    watch = _shared_poller.Watch(None, PredictionPoller("p1", 0.0))  # no owner: never closed here
    assert watch != _shared_poller.Watch(None, PredictionPoller("p1", 0.0))  # one follow(), not a value
    assert len({watch, watch}) == 1
    cancelled = watch.next_outcome()
    cancelled.cancel()  # as when the trigger's task is cancelled while it waits
    first, second = polling.PollOutcome(delay=1.0), polling.PollOutcome(delay=2.0)
    watch._tell(first)
    watch._tell(second)
    watch._tell(RuntimeError("the check broke"))
    assert await asyncio.wait_for(watch.next_outcome(), 1) is first
    assert await asyncio.wait_for(watch.next_outcome(), 1) is second
    with pytest.raises(RuntimeError, match="the check broke"):
        await asyncio.wait_for(watch.next_outcome(), 1)
    waiting = watch.next_outcome()
    assert not waiting.done()
    watch._tell(first)
    assert await asyncio.wait_for(waiting, 1) is first
