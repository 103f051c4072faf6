"""The request budget shared by every trigger of a connection in a triggerer process.

Hundreds of mapped predictions mean hundreds of triggers polling the same account at once. Their checks go
through many hooks (each worker of the shared poller has its own, and so has a trigger cancelling its
prediction), so this state cannot live in a hook: every hook of one event loop gets the same
:class:`RequestBudget` (:func:`request_budget`) for the same connection, as it gets the same HTTP session
(``_triggerer_http``).

- With a rate (the connection extra ``max_requests_per_second``), requests leave evenly spaced, a little
  over ``1 / rate`` apart, and in the order they asked (FIFO, but for urgent ones): no poll starves, and no burst reaches the
  server after a quiet spell. An *urgent* request (a cancel: ``on_kill`` has about 25 s, and at a low
  rate dozens of status checks can be queued) takes the next slot ahead of the queue, never more slots.
- With or without a rate, a ``429`` with ``Retry-After`` pauses every user of the connection, not only
  the request that got it (:meth:`RequestBudget.pause`). A request with *patience* (a batch's create in a
  worker, which would rather defer than sleep) is not held through a longer pause: it gets
  :class:`PausedTooLong` instead, unsent.

Asyncio primitives belong to one event loop, so a budget is kept per (loop, connection) in the loop's state
(``_per_loop``). Only the async path uses this (the triggerer, and a batch's own loop in its worker).
"""

from __future__ import annotations

import asyncio
import collections

from airflow_comet.hooks._per_loop import per_loop

__all__ = ["HEADROOM", "PausedTooLong", "RequestBudget", "request_budget"]

#: Requests are spaced ``(1 + HEADROOM) / rate`` apart: the slack absorbs the jitter between leaving here
#: and arriving at the server (event-loop lag, the network), so the server's own one-second windows stay
#: within the budget. 5% = 50 ms of jitter per second, whatever the rate.
HEADROOM = 0.05


class PausedTooLong(Exception):
    """The connection is paused (a ``429``'s ``Retry-After``) for longer than the request's patience."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the connection is paused for {seconds:.1f} s")
        #: Seconds of the pause left.
        self.seconds = seconds


class RequestBudget:
    """Evenly spaced, first-come first-served request slots (urgent ones first) for one connection and loop.

    :param rate: Requests per second; ``None`` means no limit (only :meth:`pause` holds requests back).
    """

    def __init__(self, rate: float | None = None) -> None:
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._urgent: collections.deque[asyncio.Future[None]] = collections.deque()  # served first
        self._patience: dict[asyncio.Future[None], float] = {}  # queued requests that give up on a long pause
        self._next = 0.0  # loop time of the next free slot
        self._paused_until = 0.0  # loop time until which nothing is sent
        self._timer: asyncio.TimerHandle | None = None
        self._interval = 0.0
        self._rate: float | None = None
        self.rate = rate

    @property
    def rate(self) -> float | None:
        return self._rate

    @rate.setter
    def rate(self, rate: float | None) -> None:
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be positive or None, got {rate!r}")
        self._rate = rate
        self._interval = (1.0 + HEADROOM) / rate if rate else 0.0

    @property
    def waiting(self) -> int:
        """Requests queued for a slot right now (cancelled ones may still be counted)."""
        return len(self._waiters) + len(self._urgent)

    def paused_for(self) -> float:
        """Seconds left of the current pause (0 when not paused)."""
        return max(0.0, self._paused_until - asyncio.get_running_loop().time())

    def take_free_slot(self) -> bool:
        """Take the current slot if it is free and nobody is queued for it (no waiting); say whether it was."""
        now = asyncio.get_running_loop().time()
        if not self._waiters and not self._urgent and now >= self._next and now >= self._paused_until:
            self._next = now + self._interval
            return True
        return False

    async def acquire(self, *, urgent: bool = False, patience: float | None = None) -> None:
        """Wait for this request's turn; returns at once when the budget has room and nobody is queued.

        :param urgent: Take the next slot ahead of the requests already queued (pauses still hold it).
        :param patience: Raise :class:`PausedTooLong` rather than wait out a pause longer than this many
            seconds, whether it began before or while this request waits (``None``: wait whatever it takes).
        """
        if patience is not None and self.paused_for() > patience:
            raise PausedTooLong(self.paused_for())
        if self.take_free_slot():
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        (self._urgent if urgent else self._waiters).append(waiter)
        if patience is not None:
            self._patience[waiter] = patience
        self._schedule(loop)
        try:
            # A cancelled (or given up) waiter stays in the queue, done, and is skipped when its turn comes.
            await waiter
        finally:
            self._patience.pop(waiter, None)

    def pause(self, seconds: float) -> None:
        """Hold every request of this connection back for ``seconds`` (a ``Retry-After``); requests already
        on the wire are not affected. Pauses never shorten one another."""
        if not seconds > 0:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        if until <= self._paused_until:
            return
        self._paused_until = until
        for waiter, patience in self._patience.items():
            if seconds > patience and not waiter.done():
                waiter.set_exception(PausedTooLong(seconds))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._schedule(loop)

    # -- internals ---------------------------------------------------------------------------------------

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arm the one timer that hands out the next slot, if there is a waiter and no timer yet."""
        if self._timer is not None or not (self._waiters or self._urgent):
            return
        when = max(self._next, self._paused_until)
        if when <= loop.time():
            self._timer = loop.call_soon(self._release, loop)  # type: ignore[assignment]
        else:
            self._timer = loop.call_at(when, self._release, loop)

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        if now < self._paused_until:  # a pause began after this timer was armed
            self._schedule(loop)
            return
        while self._urgent or self._waiters:
            waiter = (self._urgent or self._waiters).popleft()
            if waiter.done():  # cancelled while queued
                continue
            waiter.set_result(None)
            # Spacing is counted from when the slot was really given, never from when it was due: a late
            # timer (a busy loop) must not be followed by a catch-up burst.
            self._next = now + self._interval
            if self._interval:
                break
            # No rate: a pause is over and everybody may go.
        self._schedule(loop)


def request_budget(conn_id: str, rate: float | None) -> RequestBudget:
    """The budget shared by every user of ``conn_id`` in the running event loop, created on first use.

    ``rate`` is the connection's ``max_requests_per_second`` as the caller read it; when it differs (the
    connection was edited), the last caller's wins. Hooks call this when they take a session, so an edit applies
    from the next hook that does (in the triggerer, within the settings' lifetime, ``SETTINGS_TTL``).
    """
    budget = per_loop(("budget", conn_id), RequestBudget, rate)
    if budget.rate != rate:
        budget.rate = rate
    return budget
