"""Connection settings looked up once per connection and event loop, then reused for a short while.

Every trigger and every worker of the shared poller builds its own hook, and looking a connection up costs
the triggerer a hop to a worker thread (Airflow 3 asks its API server through the supervisor). A mapped
batch starts hundreds of triggers in the same second, all for the same connection: without this, each would
look it up (and ask the API server or secrets backend) on its own. Concurrent lookups of one connection share
one request, and its answer serves new hooks for :data:`SETTINGS_TTL` seconds, so an edited connection (a
rotated key) reaches new triggers and status checks within that time. A failed lookup is never kept.

A 401 has the connection looked up again sooner (:func:`settings_refused`), but only when that can help:
when the key kept is the one refused, and not again for :data:`RELOOKUP_AFTER_REFUSAL` seconds after a 401
with that key did. A revoked key with N triggers waiting would otherwise cost a lookup per 401 (to the API
server or a secrets backend), and during a rotation the late 401s of checks sent with the old key would
throw the new one away.

Kept per (event loop, connection id) in the loop's state (``_per_loop``), like the request budget and the
HTTP session: nothing outlives the loop it was made in.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from airflow_comet.hooks._per_loop import loop_state

if TYPE_CHECKING:
    from airflow_comet.hooks._settings import ConnectionSettings

__all__ = [
    "RELOOKUP_AFTER_REFUSAL",
    "SETTINGS_TTL",
    "cached_settings",
    "forget_settings",
    "settings_expire_at",
    "settings_refused",
]

#: Seconds a looked-up connection serves new hooks before it is looked up again.
SETTINGS_TTL = 30.0
#: Seconds after a 401 had the connection looked up again during which 401s with the same key do not.
RELOOKUP_AFTER_REFUSAL = 5.0


class _Entry:
    __slots__ = ("expires", "refused", "task")

    def __init__(
        self,
        expires: float,
        task: asyncio.Future[ConnectionSettings],
        refused: tuple[bytes, float] | None = None,
    ):
        self.expires = expires
        self.task = task
        #: Digest of the key whose 401 last had the connection looked up again, and when (loop time);
        #: handed on to the entry of that lookup.
        self.refused = refused


def _key(conn_id: str) -> tuple[str, str]:
    """The key of ``conn_id``'s settings in the loop's state."""
    return ("settings", conn_id)


async def cached_settings(conn_id: str, load: Callable[[], Awaitable[ConnectionSettings]]) -> ConnectionSettings:
    """The settings of ``conn_id``: ``load()``-ed at most once per :data:`SETTINGS_TTL` in the running loop."""
    state, key = loop_state(), _key(conn_id)
    now = asyncio.get_running_loop().time()
    entry = state.get(key)
    if entry is None or now >= entry.expires:
        refused = entry.refused if entry is not None else None
        entry = _Entry(now + SETTINGS_TTL, asyncio.ensure_future(load()), refused)
        state[key] = entry
    try:
        # Shielded: one caller being cancelled (its trigger stopped) must not cancel the lookup the others
        # are waiting on.
        return await asyncio.shield(entry.task)
    except Exception:
        if state.get(key) is entry:
            del state[key]
        raise


def settings_expire_at(conn_id: str) -> float:
    """The loop time at which the settings kept for ``conn_id`` in the running loop expire (now if none)."""
    entry = loop_state().get(_key(conn_id))
    return entry.expires if entry is not None else asyncio.get_running_loop().time()


def settings_refused(conn_id: str, api_key: str) -> bool:
    """A request of ``conn_id`` sent with ``api_key`` got a 401: have the next hook in the running loop look
    the connection up again (its key may have been changed), if that can help. Returns whether it will.

    It will not when the settings kept hold another key (a request sent with the old one before a rotation
    answering late), when a lookup is already on its way or nothing is kept (the next hook looks it up
    anyway), or when a 401 with this key had it looked up less than :data:`RELOOKUP_AFTER_REFUSAL` s ago.
    """
    entry = loop_state().get(_key(conn_id))
    if entry is None:
        return False
    task = entry.task
    if not task.done() or task.cancelled() or task.exception() is not None or task.result().api_key != api_key:
        return False
    now = asyncio.get_running_loop().time()
    digest = hashlib.sha256(api_key.encode()).digest()  # not a second copy of the key
    if entry.refused is not None and entry.refused[0] == digest and now - entry.refused[1] < RELOOKUP_AFTER_REFUSAL:
        return False
    entry.expires = now  # expired, not dropped: the entry of the next lookup takes ``refused`` over
    entry.refused = (digest, now)
    return True


def forget_settings(conn_id: str) -> None:
    """Drop the settings kept for ``conn_id`` in the running loop: the next hook looks the connection up."""
    loop_state().pop(_key(conn_id), None)
