"""The ``with`` protocol of what the tests start and must stop again: the Airflow deployment
(``deployment.py``) and the throw-away PostgreSQL cluster (``tests/reliability/postgres.py``)."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["StartStopContext"]

_Self = TypeVar("_Self", bound="StartStopContext")


class StartStopContext:
    """``with obj:`` calls ``start()`` and, on the way out, ``stop()``.

    A ``start()`` that fails part-way is followed by ``stop()`` too (then the error is raised again): what it
    had already started must not outlive the test. So ``stop()`` must cope with a partly started object."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Self) -> _Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
