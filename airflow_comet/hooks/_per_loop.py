"""Objects kept per (event loop, name): asyncio timers, futures and connections belong to the loop that made them.

A triggerer whose loop is restarted, or a test calling ``asyncio.run`` twice, must get fresh ones, never a
future or timer of a dead loop. The loop's id alone could be reused by a new loop once the old one is gone,
so a weak reference to the loop is checked on every lookup.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["per_loop"]

T = TypeVar("T")

Registry = dict[tuple[int, str], tuple["weakref.ref[asyncio.AbstractEventLoop]", T]]

_lock = threading.Lock()


def per_loop(registry: Registry[T], name: str, make: Callable[..., T], *args: Any) -> T:
    """The object kept in ``registry`` under ``name`` for the running loop; ``make(*args)`` builds it on first
    use (arguments rather than a closure: callers look up once per request, and a closure would be built on
    every lookup for the few that create).

    Creating one also drops the entries of loops that are closed or gone, so the registry never grows with
    dead loops.
    """
    loop = asyncio.get_running_loop()
    key = (id(loop), name)
    entry = registry.get(key)
    if entry is None or entry[0]() is not loop:
        with _lock:
            entry = registry.get(key)
            if entry is None or entry[0]() is not loop:
                for stale, (ref, _) in list(registry.items()):
                    old = ref()
                    if old is None or old.is_closed():
                        del registry[stale]
                entry = (weakref.ref(loop), make(*args))
                registry[key] = entry
    return entry[1]
