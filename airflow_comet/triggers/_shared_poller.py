"""One status poller per connection and event loop, shared by every ``PredictionTrigger`` of a triggerer.

A trigger that sleeps and polls on its own wakes the event loop, and its own task, for every status check,
and holds a timer and a hook of its own; with thousands of triggers that adds up (benchmarks/RESULTS.md).
So triggers hand their predictions here:

- one timer for the whole connection over a heap of due times, each rounded to the nearest
  :data:`TICK` of the loop's clock: the checks that fall due in one tick are sent together, and their
  answers come back and are handled together too, so one wake-up of the event loop serves many checks
  instead of one each. Rounding to the nearest tick moves a check by at most half a tick, as often earlier as later: the schedule's cadence,
  its requests and its detection latency stay what they were on average;
- short-lived worker tasks send the queued checks, one each, each through a hook of its own (so
  through the connection's shared HTTP session and request budget, with settings at most
  ``SETTINGS_TTL`` old: a worker's hook is handed to the next worker until then, rather than a new hook
  looking the connection up and taking a share of the session per check), and give each answer to that
  prediction's own :class:`~airflow_comet.polling.PredictionPoller` (its :class:`Watch` holds one), which
  decides exactly as in the worker's blocking wait.
  A check is sent once: a failed one is retried by the prediction's own schedule (the poller backs off
  after errors), so a worker is never held by another prediction's retries, and a ``429``'s
  ``Retry-After`` still pauses the whole connection (the budget);
- a trigger's own task wakes only for what it logs or yields: a status change (when its trigger logs
  them), a failed check, an answer that made no sense, the end; a check queued long past its deadline is
  not sent (the timeout fires at once), and a connection lookup that fails mid-wait leaves the checks on the
  last good settings.

The workers run in an empty ``contextvars`` context: a trigger's log context (Airflow routes a trigger's log
lines by it) never follows another trigger's status check. Kept per event loop (``hooks._per_loop``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import heapq
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from airflow_comet.exceptions import CometAPIError, CometAPITransportError
from airflow_comet.hooks._per_loop import per_loop
from airflow_comet.hooks._retry import RetryPolicy
from airflow_comet.hooks._settings_cache import settings_expire_at
from airflow_comet.hooks._triggerer_http import MAX_CONNECTIONS
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.polling import DEADLINE_SLACK, PredictionPoller

if TYPE_CHECKING:
    from airflow_comet.hooks._settings import ConnectionSettings
    from airflow_comet.polling import PollOutcome

log = logging.getLogger(__name__)

__all__ = ["SharedPoller", "Watch", "shared_poller"]

#: Due times are rounded to the nearest multiple of this many seconds of the loop's clock (one batch each).
TICK = 0.3
#: The timer never fires sooner than this after it was armed, and takes the checks due this close.
SLACK = 0.025
#: One worker per this many queued checks. One: the batch's checks are all on the wire at once and their
#: answers are handled in the same few loop iterations (sending them back to back costs a wake-up each).
CHECKS_PER_WORKER = 1
#: Status checks in flight at once per connection and triggerer (CometAPI advises capping concurrency): as many
#: as the session's connections, kept alive between ticks. It binds when a tick holds more checks (thousands
#: of triggers starting at once: the rest follow back to back) and when answers take seconds, where it keeps
#: a slow API from being piled on.
MAX_WORKERS = MAX_CONNECTIONS
#: Queued checks still waiting this long after a check began get workers of their own: one slow answer
#: (a status query can take tens of seconds) must not hold back the checks queued behind it.
BACKLOG_GRACE = 0.5
#: Checks are sent once; the prediction's schedule is the retry (see the module docstring).
SINGLE_ATTEMPT = RetryPolicy(max_retries=0)


class Watch:
    """One prediction followed by the shared poller: its :class:`~airflow_comet.polling.PredictionPoller`
    (:attr:`poller`: the decisions, as in the worker's blocking wait) and what its trigger hears, through
    :meth:`next_outcome`.
    """

    def __init__(self, owner: SharedPoller | None, poller: PredictionPoller, tell_changes: bool = True) -> None:
        self._owner = owner
        self.poller = poller
        self.tell_changes = tell_changes
        self.closed = False
        self._notes: collections.deque[PollOutcome | Exception] = collections.deque()
        self._waiter: asyncio.Future[PollOutcome] | None = None

    def __repr__(self) -> str:
        return f"<Watch {self.prediction_id} polls={self.polls} closed={self.closed}>"

    @property
    def prediction_id(self) -> str:
        return self.poller.prediction_id

    @property
    def polls(self) -> int:
        """Status checks made so far."""
        return self.poller.polls

    @property
    def last_prediction(self) -> dict[str, Any] | None:
        """The prediction object of the last status answer (see the poller's)."""
        return self.poller.last_prediction

    def next_outcome(self) -> asyncio.Future[PollOutcome]:
        """The next outcome worth telling (a new status if ``tell_changes``, a problem, or the event that ends
        the wait), to await.

        Awaiting it raises what a status check raised that was not an API error (the wait cannot go on).
        """
        waiter: asyncio.Future[PollOutcome] = asyncio.get_running_loop().create_future()
        if self._notes:
            _settle(waiter, self._notes.popleft())
        else:
            self._waiter = waiter
        return waiter

    def close(self) -> None:
        """Stop following this prediction (idempotent); a check already on the wire is answered and dropped."""
        if not self.closed:
            self.closed = True
            if self._owner is not None:
                self._owner._closed(self)

    def _tell(self, note: PollOutcome | Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():  # done: cancelled with its trigger's task
            _settle(waiter, note)
            return
        self._notes.append(note)


def _settle(waiter: asyncio.Future[PollOutcome], note: PollOutcome | Exception) -> None:
    if isinstance(note, Exception):
        waiter.set_exception(note)
    else:
        waiter.set_result(note)


class SharedPoller:
    """Status checks of every followed prediction of one connection, in one event loop.

    :param conn_id: The CometAPI connection the checks go through.
    """

    def __init__(self, conn_id: str) -> None:
        self.conn_id = conn_id
        self._loop = asyncio.get_running_loop()
        # The checks due at each loop time (a tick, mostly), and a heap of those times: a tick's checks are
        # taken together.
        self._due: list[float] = []
        self._buckets: dict[float, list[Watch]] = {}
        self._ready: collections.deque[Watch] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._backlog_timer: asyncio.TimerHandle | None = None
        self._open = 0
        self._workers = 0
        self._checking = 0  # workers waiting on an answer
        self._tasks: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references to tasks
        # Hooks of finished workers with the loop time their settings expire (those kept for the loop's
        # hooks, at most SETTINGS_TTL old), handed to the next workers until then. Each holds a share of the
        # connection's session, so its keep-alive connections survive the gaps between ticks.
        self._idle_hooks: list[tuple[float, CometAPIHook]] = []
        self._settings: ConnectionSettings | None = None  # the last good lookup

    @property
    def following(self) -> int:
        """Predictions followed right now."""
        return self._open

    @property
    def in_flight(self) -> int:
        """Worker tasks running right now (each has at most one status check on the wire)."""
        return self._workers

    def follow(
        self,
        prediction_id: str,
        started_at: float,
        *,
        end_time: float | None = None,
        poll_interval: float = 20.0,
        tell_changes: bool = True,
    ) -> Watch:
        """Start following a prediction (the parameters are :class:`~airflow_comet.polling.PredictionPoller`'s):
        its first check comes at the watch's ``first_delay``.

        :param tell_changes: Whether the watch hears of status changes, or only of problems and the end (a
            trigger that would not log them need not wake for them).
        """
        poller = PredictionPoller(prediction_id, started_at, end_time=end_time, poll_interval=poll_interval)
        watch = Watch(self, poller, tell_changes)
        self._open += 1
        self._schedule(watch, poller.first_delay(time.time()))
        return watch

    # -- schedule ----------------------------------------------------------------------------------------

    def _schedule(self, watch: Watch, delay: float) -> None:
        if delay <= 0:
            self._ready.append(watch)
            self._start_workers()
            return
        when = self._loop.time() + delay
        end = watch.poller.end_time
        if delay >= TICK and (end is None or time.time() + delay < end - DEADLINE_SLACK):
            # Never the wait for a deadline: rounded to just before it, that check would be one more request
            # (and a wait shorter than a tick, rounded, could come back again and again until it passed).
            when = round(when / TICK) * TICK
        bucket = self._buckets.get(when)
        if bucket is not None:
            bucket.append(watch)
            return
        self._buckets[when] = [watch]
        heapq.heappush(self._due, when)
        if when < self._timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        # Never sooner than SLACK after now: a busy stretch costs one wake-up per SLACK, not one per check.
        at = max(when, self._loop.time() + SLACK)
        if at >= self._timer_at:  # re-arming must never push the pending batch later
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        horizon = self._loop.time() + SLACK
        due = self._due
        while due and due[0] <= horizon:
            for watch in self._buckets.pop(heapq.heappop(due)):
                if not watch.closed:
                    self._ready.append(watch)
        self._start_workers()
        if due:
            self._arm(due[0])

    # -- workers -----------------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        # Workers already waiting on an answer are not counted as serving the queue (see BACKLOG_GRACE).
        wanted = min(MAX_WORKERS, self._checking + -(-len(self._ready) // CHECKS_PER_WORKER))
        while self._workers < wanted:
            self._workers += 1
            self._spawn(self._work(), self._worker_done)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # Counted down here, not in the coroutine's finally: a worker cancelled before its first step (the
        # loop shutting down) never runs that.
        self._workers -= 1
        if self._ready and not task.cancelled():  # queued while this worker was finishing
            self._start_workers()
        self._release_if_idle()

    def _watch_backlog(self) -> None:
        """Checks are queued behind the one just begun: look again in BACKLOG_GRACE seconds."""
        if self._ready and self._backlog_timer is None:
            self._backlog_timer = self._loop.call_later(BACKLOG_GRACE, self._on_backlog_timer)

    def _on_backlog_timer(self) -> None:
        self._backlog_timer = None
        self._start_workers()
        self._watch_backlog()

    def _spawn(self, coro: Coroutine[Any, Any, None], done: Callable[[asyncio.Task[None]], None]) -> None:
        """Run ``coro`` in a task of its own; ``done(task)`` is called when it ends and must discard it from
        ``_tasks``."""
        # In an empty context, not that of the trigger that happened to call (a task copies the context it is
        # created in): a trigger's log context must not follow another trigger's check.
        task = contextvars.Context().run(self._loop.create_task, coro)
        self._tasks.add(task)
        task.add_done_callback(done)

    def _take_hook(self) -> tuple[CometAPIHook, float | None, list[CometAPIHook]]:
        """An idle hook whose settings have not expired and the loop time they do, or a new hook and ``None``;
        and the expired idle hooks passed over, for the caller to close."""
        now = self._loop.time()
        expired: list[CometAPIHook] = []
        while self._idle_hooks:
            expires, hook = self._idle_hooks.pop()
            if now < expires:
                return hook, expires, expired
            expired.append(hook)
        return CometAPIHook(cometapi_conn_id=self.conn_id, retry_policy=SINGLE_ATTEMPT), None, expired

    async def _work(self) -> None:
        # A hook per worker at a time: its settings are looked up (from the per-loop cache) when it is made,
        # and it serves later workers only until those expire, so an edited connection reaches the checks
        # within SETTINGS_TTL; a 401 makes a hook drop its settings and session share, and such a hook is never
        # handed on, so it touches no other worker's checks.
        hook, expires, expired = self._take_hook()
        lookup_error = None
        try:
            if expires is None:
                lookup_error, fresh = await self._look_up(hook)
                # Handed on only with settings of its own lookup, not the last good ones of a failed one.
                expires = settings_expire_at(self.conn_id) if fresh else None
            if expired:
                # Closed once this hook holds its share of the session: closed first, they could be its last
                # users and take the session's keep-alive connections with them.
                with contextlib.suppress(Exception):  # a session that cannot be opened fails the check, below
                    await hook._alease()
                for old in expired:
                    await old.aclose()
            while self._ready:
                watch = self._ready.popleft()
                if watch.closed:
                    continue
                overdue = watch.poller.timeout_if_overdue(time.time())
                if overdue is not None:  # queued so long behind slow answers that its deadline passed
                    watch._tell(overdue)
                    continue
                await self._check(hook, watch, lookup_error)
        finally:
            if self._open and expires is not None and hook._settings is not None and hook._lease is not None:
                self._idle_hooks.append((expires, hook))
            else:
                await hook.aclose()

    async def _look_up(self, hook: CometAPIHook) -> tuple[CometAPITransportError | None, bool]:
        """Give ``hook`` the connection's settings: fresh, or the last good ones when the lookup fails (an
        API server restarting must not end every wait whose check falls in that moment). With no good ones
        yet, the failure, as a transient error each check of this worker reports. Also says whether the
        settings are fresh (the lookup worked)."""
        try:
            self._settings = await hook.aget_settings()
        except Exception as error:  # noqa: BLE001 - any lookup failure is worth waiting out
            if self._settings is None:
                return CometAPITransportError(
                    f"looking up connection {self.conn_id!r} failed ({error})", maybe_sent=False
                ), False
            log.warning("Looking up connection %s failed (%s); checking with its last settings", self.conn_id, error)
            hook._settings = self._settings
            return None, False
        return None, True

    async def _check(self, hook: CometAPIHook, watch: Watch, lookup_error: CometAPIError | None) -> None:
        self._checking += 1
        self._watch_backlog()
        try:
            outcome = await self._decide(hook, watch.poller, lookup_error)
        except Exception as error:  # noqa: BLE001 - its trigger reports it as its event; other checks go on
            watch._tell(error)
            return
        finally:
            self._checking -= 1
        if watch.closed:
            return
        if outcome.event is None:
            self._schedule(watch, outcome.delay)
        if outcome.event is not None or outcome.problem or (outcome.new_status and watch.tell_changes):
            watch._tell(outcome)

    @staticmethod
    async def _decide(hook: CometAPIHook, poller: PredictionPoller, lookup_error: CometAPIError | None) -> PollOutcome:
        """One status check (unless the lookup already failed) and the poller's decision on it."""
        if lookup_error is not None:
            return poller.on_error(lookup_error, time.time())
        try:
            prediction = await hook.aget_prediction(poller.prediction_id)
        except CometAPIError as error:
            return poller.on_error(error, time.time())
        return poller.on_prediction(prediction, time.time())

    # -- lifetime ----------------------------------------------------------------------------------------

    def _closed(self, watch: Watch) -> None:
        # It stays in its bucket until that is due and is skipped then: removing it now would cost a search.
        self._open -= 1
        self._release_if_idle()

    def _release_if_idle(self) -> None:
        """With nothing followed and no worker left, give the session back and stop the timer."""
        if self._open or self._workers:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        if self._backlog_timer is not None:
            self._backlog_timer.cancel()
            self._backlog_timer = None
        self._due.clear()
        self._buckets.clear()
        self._ready.clear()
        idle, self._idle_hooks = self._idle_hooks, []
        for _, hook in idle:
            self._spawn(hook.aclose(), self._tasks.discard)


def shared_poller(conn_id: str) -> SharedPoller:
    """The poller every trigger of ``conn_id`` shares in the running event loop."""
    return per_loop(("poller", conn_id), SharedPoller, conn_id)
