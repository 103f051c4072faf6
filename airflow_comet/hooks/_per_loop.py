"""The one registry of state kept per event loop: asyncio timers, futures, HTTP sessions and tasks belong to
the loop that made them.

The triggerer's shared state lives here, each under a key of its own: the request budgets
(``_ratelimit``), the HTTP sessions (``_triggerer_http``), the looked-up settings (``_settings_cache``) and
the shared pollers (``triggers._shared_poller``). A triggerer whose loop is restarted, or a test calling
``asyncio.run`` twice, gets fresh state, never a future, timer or connection of a dead loop. The loop's id
alone could be reused by a new loop once the old one is gone, so a weak reference to the loop is checked on
every lookup, and the state of closed or gone loops is dropped when a new loop's is made.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["loop_state", "per_loop"]

T = TypeVar("T")

_loops: dict[int, tuple[weakref.ref[asyncio.AbstractEventLoop], dict[Hashable, Any]]] = {}
_lock = threading.Lock()  # loops of other threads may make their state at the same time


def loop_state() -> dict[Hashable, Any]:
    """The running loop's state: a dict its users keep their entries in, under keys of their own."""
    loop = asyncio.get_running_loop()
    entry = _loops.get(id(loop))
    if entry is None or entry[0]() is not loop:
        with _lock:
            entry = _loops.get(id(loop))
            if entry is None or entry[0]() is not loop:
                for key, (ref, _) in list(_loops.items()):
                    old = ref()
                    if old is None or old.is_closed():
                        del _loops[key]
                entry = (weakref.ref(loop), {})
                _loops[id(loop)] = entry
    return entry[1]


def per_loop(key: Hashable, make: Callable[..., T], *args: Any) -> T:
    """The object kept under ``key`` for the running loop; ``make(*args)`` builds it on first use."""
    state = loop_state()
    value = state.get(key)
    if value is None:
        value = state[key] = make(*args)
    return value
