"""Per-connection state shared by every trigger of a triggerer process: a request budget and one HTTP pool.

Hundreds of mapped predictions mean hundreds of triggers polling the same account at once. Their checks go
through many hooks (each worker of the shared poller has its own, and so has a trigger cancelling its
prediction), so this state cannot live in a hook: every hook of one event loop gets the same
:class:`RequestBudget` (:func:`request_budget`) and the same pool of keep-alive connections
(:func:`shared_pool`) for the same connection.

- With a rate (the connection extra ``max_requests_per_second``), requests leave evenly spaced, a little
  over ``1 / rate`` apart, and in the order they asked (FIFO, but for urgent ones): no poll starves, and no burst reaches the
  server after a quiet spell. An *urgent* request (a cancel: ``on_kill`` has about 25 s, and at a low
  rate dozens of status checks can be queued) takes the next slot ahead of the queue, never more slots.
- With or without a rate, a ``429`` with ``Retry-After`` pauses every user of the connection, not only
  the request that got it (:meth:`RequestBudget.pause`).
- One pool of keep-alive connections per connection instead of one per trigger: a few connections serve
  thousands of triggers, and a prediction polled every 20 s no longer reconnects each time (an idle
  connection is dropped after 15 s). The pool is reference-counted: it closes when the last hook using it
  lets go (:func:`release_pool`), never under another trigger's feet.

Asyncio primitives and connections belong to one event loop, so everything here is kept per (loop,
connection): a triggerer whose loop is restarted (or a test calling ``asyncio.run`` twice) gets fresh
ones, never a future, timer or connection of a dead loop. Only the async (triggerer) path uses this;
workers send one request at a time.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow_comet.hooks._per_loop import Registry, per_loop

if TYPE_CHECKING:
    from airflow_comet.hooks._http1 import ConnectionPool
    from airflow_comet.hooks._protocol import ConnectionSettings

__all__ = ["HEADROOM", "RequestBudget", "release_pool", "request_budget", "shared_pool"]

#: Requests are spaced ``(1 + HEADROOM) / rate`` apart: the slack absorbs the jitter between leaving here
#: and arriving at the server (event-loop lag, the network), so the server's own one-second windows stay
#: within the budget. 5% = 50 ms of jitter per second, whatever the rate.
HEADROOM = 0.05


class RequestBudget:
    """Evenly spaced, first-come first-served request slots (urgent ones first) for one connection and loop.

    :param rate: Requests per second; ``None`` means no limit (only :meth:`pause` holds requests back).
    """

    def __init__(self, rate: float | None = None) -> None:
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._urgent: collections.deque[asyncio.Future[None]] = collections.deque()  # served first
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

    async def acquire(self, *, urgent: bool = False) -> None:
        """Wait for this request's turn; returns at once when the budget has room and nobody is queued.

        :param urgent: Take the next slot ahead of the requests already queued (pauses still hold it).
        """
        if self.take_free_slot():
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        (self._urgent if urgent else self._waiters).append(waiter)
        self._schedule(loop)
        # A cancelled waiter stays in the queue, done, and is skipped when its turn comes.
        await waiter

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


# (id(loop), conn_id) -> (weak reference to the loop, its budget): see ``_per_loop``.
_budgets: Registry[RequestBudget] = {}
_lock = threading.Lock()


def request_budget(conn_id: str, rate: float | None) -> RequestBudget:
    """The budget shared by every user of ``conn_id`` in the running event loop, created on first use.

    ``rate`` is the connection's ``max_requests_per_second`` as the caller read it; when it differs (the
    connection was edited), the last caller's wins. Hooks call this when they take a pool, so an edit applies
    from the next hook that does (in the triggerer, within the settings' lifetime, ``SETTINGS_TTL``).
    """
    budget = per_loop(_budgets, conn_id, RequestBudget, rate)
    if budget.rate != rate:
        budget.rate = rate
    return budget


# -- one connection pool per (loop, connection) -----------------------------------------------------------


class _Shared:
    __slots__ = ("key", "loop", "pool", "users")

    def __init__(self, key: tuple[Any, ...], loop: asyncio.AbstractEventLoop, pool: ConnectionPool):
        self.key = key
        self.loop = weakref.ref(loop)
        self.pool = pool
        self.users = 0


# (id(loop), conn_id, fingerprint of what the pool carries) -> entry; id(pool) -> entry.
_pools: dict[tuple[Any, ...], _Shared] = {}
_by_pool: dict[int, _Shared] = {}


def shared_pool(settings: ConnectionSettings, make: Callable[[], ConnectionPool]) -> ConnectionPool:
    """The pool every hook of ``settings.conn_id`` shares in the running loop (``make`` builds it on first
    use). Each call counts one user; give it back with :func:`release_pool`.

    The key includes a digest of everything the pool carries (base URL, key, timeouts, proxy, TLS check):
    after the connection is edited, new triggers get a new pool while running ones finish on the old one.
    """
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256(
        repr(
            (
                settings.base_url,
                settings.api_key,
                settings.connect_timeout,
                settings.read_timeout,
                settings.proxy,
                settings.verify,
            )
        ).encode()
    ).hexdigest()
    key = (id(loop), settings.conn_id, digest)
    with _lock:
        entry = _pools.get(key)
        if entry is None or entry.loop() is not loop or entry.pool.closed:
            _forget_dead_pools()
            entry = _Shared(key, loop, make())
            _pools[key] = entry
            _by_pool[id(entry.pool)] = entry
        entry.users += 1
        return entry.pool


async def release_pool(pool: ConnectionPool) -> None:
    """One user lets go of ``pool``: a shared pool closes with its last user, any other at once."""
    with _lock:
        entry = _by_pool.get(id(pool))
        if entry is not None and entry.pool is pool:
            entry.users -= 1
            if entry.users > 0:
                return
            # Forgotten before closing, so that a hook arriving meanwhile builds a new pool.
            _by_pool.pop(id(pool), None)
            if _pools.get(entry.key) is entry:
                del _pools[entry.key]
    if not pool.closed:
        await pool.close()


def _forget_dead_pools() -> None:
    """Drop entries of closed or gone loops, and closed pools (called with ``_lock`` held)."""
    for key, entry in list(_pools.items()):
        loop = entry.loop()
        if loop is None or loop.is_closed() or entry.pool.closed:
            del _pools[key]
            _by_pool.pop(id(entry.pool), None)
