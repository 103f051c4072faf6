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

__all__ = ["in_worker_loop", "loop_state", "new_worker_loop", "per_loop"]

T = TypeVar("T")

_loops: dict[int, tuple[weakref.ref[asyncio.AbstractEventLoop], dict[Hashable, Any]]] = {}
_lock = threading.Lock()  # loops of other threads may make their state at the same time


#: Key of the flag set in a worker's own event loop (see :func:`new_worker_loop`).
_WORKER_LOOP = "worker_loop"


def loop_state() -> dict[Hashable, Any]:
    """The running loop's state: a dict its users keep their entries in, under keys of their own."""
    return _state_of(asyncio.get_running_loop())


def _state_of(loop: asyncio.AbstractEventLoop) -> dict[Hashable, Any]:
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


def new_worker_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for a task that runs async code in its worker between blocking calls.

    Such a task talks to Airflow's supervisor with blocking calls (connection lookups, the task state store),
    from its main thread and from threads. Async code in the loop must not use the task SDK's async calls as
    well: a lookup in flight when ``run_until_complete`` returns keeps the comms lock (taken in an executor
    thread, released only when its coroutine runs again), and the next blocking call waits for it forever.
    In this loop :func:`in_worker_loop` is true, and connections are looked up with the blocking call in a
    thread instead.
    """
    loop = asyncio.new_event_loop()
    _state_of(loop)[_WORKER_LOOP] = True
    return loop


def in_worker_loop() -> bool:
    """Whether the running loop was made by :func:`new_worker_loop`."""
    return bool(loop_state().get(_WORKER_LOOP))
