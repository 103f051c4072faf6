"""Connection settings looked up once per connection and event loop, then reused for a short while.

Every trigger and every worker of the shared poller builds its own hook, and looking a connection up costs
the triggerer about 0.7 ms of CPU and a hop to a worker thread (Airflow 3 asks its API server through the
supervisor). A mapped batch starts
hundreds of triggers in the same second, all for the same connection: without this, those lookups are the
largest part of a trigger's start-up (benchmarks/RESULTS.md). Concurrent lookups of one connection share
one request, and its answer serves new hooks for :data:`SETTINGS_TTL` seconds, so an edited connection (a
rotated key) reaches new triggers and status checks within that time. A failed lookup is never kept.

Kept per (event loop, connection id), like the request budget and the shared pool: nothing outlives the
loop it was made in.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_comet.hooks._protocol import ConnectionSettings

__all__ = ["SETTINGS_TTL", "cached_settings", "forget_settings", "settings_expire_at"]

#: Seconds a looked-up connection serves new hooks before it is looked up again.
SETTINGS_TTL = 30.0


class _Entry:
    __slots__ = ("expires", "loop", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop, expires: float, task: asyncio.Future[ConnectionSettings]):
        self.loop = weakref.ref(loop)
        self.expires = expires
        self.task = task


_entries: dict[tuple[int, str], _Entry] = {}


async def cached_settings(
    conn_id: str, load: Callable[[], Awaitable[ConnectionSettings]]
) -> ConnectionSettings:
    """The settings of ``conn_id``: ``load()``-ed at most once per :data:`SETTINGS_TTL` in the running loop."""
    loop = asyncio.get_running_loop()
    key = (id(loop), conn_id)
    now = loop.time()
    entry = _entries.get(key)
    if entry is None or entry.loop() is not loop or now >= entry.expires:
        _forget_dead_loops()
        entry = _Entry(loop, now + SETTINGS_TTL, asyncio.ensure_future(load()))
        _entries[key] = entry
    try:
        # Shielded: one caller being cancelled (its trigger stopped) must not cancel the lookup the others
        # are waiting on.
        return await asyncio.shield(entry.task)
    except Exception:
        if _entries.get(key) is entry:
            del _entries[key]
        raise


def settings_expire_at(conn_id: str) -> float:
    """The loop time at which the settings kept for ``conn_id`` in the running loop expire (now if none)."""
    loop = asyncio.get_running_loop()
    entry = _entries.get((id(loop), conn_id))
    return entry.expires if entry is not None and entry.loop() is loop else loop.time()


def forget_settings(conn_id: str) -> None:
    """Drop what is kept for ``conn_id`` in the running loop (the next hook looks the connection up)."""
    _entries.pop((id(asyncio.get_running_loop()), conn_id), None)


def _forget_dead_loops() -> None:
    for key, entry in list(_entries.items()):
        loop = entry.loop()
        if loop is None or loop.is_closed():
            del _entries[key]
