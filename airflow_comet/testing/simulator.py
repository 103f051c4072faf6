"""``CometAPISimulator``: a real HTTP CometAPI stand-in on loopback, for tests and benchmarks.

Two aiohttp servers (the API and the file-delivery host) share one event loop that runs in a
background daemon thread, so synchronous code can use the simulator while async servers keep thousands
of idle keep-alive connections cheap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from typing import Any
from urllib.parse import quote

from aiohttp import web

from airflow_comet.testing.api import build_api_app
from airflow_comet.testing.delivery import build_delivery_app
from airflow_comet.testing.faults import Faults
from airflow_comet.testing.models import ModelsArg, normalize_models
from airflow_comet.testing.state import RequestRecord, SimulatorState

__all__ = ["CometAPISimulator"]

_LOOPBACK_NAMES = ("127.0.0.1", "localhost")
_STOP_TIMEOUT = 10.0


class CometAPISimulator:
    """CometAPI's Replicate-format API on ``127.0.0.1``, plus a delivery host for the output files.

    Use as a context manager (``with CometAPISimulator() as sim: ...``) or call :meth:`start` and
    :meth:`stop`. ``port=0`` (the default) picks a free port for each server.
    """

    def __init__(
        self,
        api_key: str = "sim-key",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        delivery_port: int = 0,
        faults: Faults | None = None,
        seed: int | None = 0,
        models: ModelsArg = None,
        request_log_limit: int | None = 200_000,
        backlog: int = 4096,
    ) -> None:
        if host not in _LOOPBACK_NAMES:
            raise ValueError(
                f"CometAPISimulator binds to 127.0.0.1 only (it has no auth on its admin endpoints); got host={host!r}"
            )
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.api_key = api_key
        self.host = "127.0.0.1"
        self._ports = {"api": int(port), "delivery": int(delivery_port)}
        self._backlog = backlog
        self._state = SimulatorState(normalize_models(models), faults or Faults(), seed, request_log_limit)
        self._bound: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []
        self._servers: list[asyncio.AbstractServer] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> CometAPISimulator:
        """Bind both servers and start serving; returns once requests can be answered.

        Also lifts this process's soft open-files limit to the hard limit (thousands of keep-alive
        clients need thousands of descriptors)."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        _raise_open_file_limit()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="cometapi-simulator", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout=30)
        except BaseException:
            self._thread.join(timeout=_STOP_TIMEOUT)
            self._thread = None
            raise
        return self

    def stop(self) -> None:
        """Close both servers and end the loop thread. Safe to call twice."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=_STOP_TIMEOUT)
        self._thread = None

    def __enter__(self) -> CometAPISimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - e.g. the port is taken: report it to start()
            loop.run_until_complete(self._close())
            loop.close()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._close())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        apps = {"api": build_api_app(self._state, self.api_key), "delivery": build_delivery_app(self._state)}
        # Delivery first: the API needs its URL for the prediction objects.
        for name in ("delivery", "api"):
            # No access log (it would cost more than the handlers under load); short shutdown so a
            # slow-fault handler cannot hold stop() for long.
            runner = web.AppRunner(apps[name], access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            self._runners.append(runner)
            # Our own listening socket instead of a TCPSite, so every accepted connection is counted.
            server = await loop.create_server(
                _counting(runner.server, self._state, name), self.host, self._ports[name], backlog=self._backlog
            )
            self._servers.append(server)
            self._bound[name] = server.sockets[0].getsockname()[1]
            if name == "delivery":
                self._state.delivery_url = f"http://{self.host}:{self._bound['delivery']}"

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for runner in self._runners:
            await runner.cleanup()
        self._servers.clear()
        self._runners.clear()

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port("api")

    @property
    def delivery_port(self) -> int:
        return self._port("delivery")

    @property
    def base_url(self) -> str:
        """The API base URL (what a CometAPI connection's host holds), e.g. ``http://127.0.0.1:54321``."""
        return f"http://{self.host}:{self.port}"

    @property
    def delivery_url(self) -> str:
        """Base URL of the file-delivery host that output and ``urls.*`` links point at."""
        return f"http://{self.host}:{self.delivery_port}"

    def _port(self, name: str) -> int:
        if name not in self._bound:
            raise RuntimeError("simulator not started: call start() or use it as a context manager")
        return self._bound[name]

    def connection_json(self) -> str:
        """Value for ``AIRFLOW_CONN_COMETAPI_DEFAULT`` pointing at this simulator."""
        return json.dumps({"conn_type": "cometapi", "password": self.api_key, "host": self.base_url})

    def connection_uri(self) -> str:
        """The same connection as an Airflow URI (host with scheme, as ``Connection.get_uri`` writes it)."""
        return f"cometapi://http://:{quote(self.api_key, safe='')}@{quote(f'{self.host}:{self.port}', safe='')}"

    # -- faults ------------------------------------------------------------------------------------
    @property
    def faults(self) -> Faults:
        return self._state.faults

    def set_faults(self, faults: Faults | None = None, /, **fields: Any) -> Faults:
        """Replace the faults: pass a :class:`Faults`, or its fields as keywords (``fail_rate=1``).
        Burst counters (429s, create 5xx) are re-armed."""
        if faults is not None and fields:
            raise TypeError("pass either a Faults or keyword fields, not both")
        new = faults if faults is not None else Faults(**fields)
        self._state.set_faults(new)
        return new

    def reset(self) -> None:
        """Forget predictions, requests and counters; restore the constructor's faults and seed."""
        self._state.reset()

    # -- what happened -------------------------------------------------------------------------
    @property
    def requests(self) -> list[RequestRecord]:
        """Every recorded request in the order they were answered (a copy; admin calls excluded)."""
        with self._state.lock:
            return list(self._state.log)

    def _select(self, endpoint: str, prediction_id: str | None = None) -> list[RequestRecord]:
        return [
            r
            for r in self.requests
            if r.endpoint == endpoint and (prediction_id is None or r.prediction_id == prediction_id)
        ]

    def creates(self) -> list[RequestRecord]:
        return self._select("create")

    def polls(self, prediction_id: str | None = None) -> list[RequestRecord]:
        return self._select("status", prediction_id)

    def cancels(self, prediction_id: str | None = None) -> list[RequestRecord]:
        return self._select("cancel", prediction_id)

    def downloads(self, prediction_id: str | None = None) -> list[RequestRecord]:
        return self._select("file", prediction_id)

    def delivery_requests(self) -> list[RequestRecord]:
        """Everything the delivery host saw (files, followed ``urls.*`` links, anything else)."""
        return [r for r in self.requests if r.server == "delivery"]

    def prediction(self, prediction_id: str) -> dict[str, Any]:
        """The prediction as the API would show it now, plus ``sim_duration``, ``sim_terminal_epoch``
        and ``sim_terminal_monotonic`` (when it became/becomes terminal; ``None`` = never)."""
        found = self._state.get(prediction_id)
        if found is None:
            raise KeyError(prediction_id)
        return self._state.describe(found)

    def predictions(self) -> list[dict[str, Any]]:
        with self._state.lock:
            return [self._state.describe(p) for p in self._state.predictions.values()]

    def max_requests_per_second(self) -> int:
        """Most API requests (admin excluded) that arrived within one wall-clock second."""
        with self._state.lock:
            return max(self._state.per_second.values(), default=0)

    def connections_opened(self, server: str = "api") -> int:
        """TCP connections accepted by ``server`` ("api" or "delivery") since start/reset."""
        with self._state.lock:
            return self._state.connections[server]

    def __repr__(self) -> str:
        where = self.base_url if self._bound else "not started"
        return f"<CometAPISimulator {where}>"


def _counting(factory: Any, state: SimulatorState, name: str) -> Any:
    """Wrap aiohttp's protocol factory: asyncio calls it once per accepted connection."""

    def make() -> Any:
        state.connection_opened(name)
        return factory()

    return make


def _raise_open_file_limit() -> None:
    """Lift the soft open-files limit to the hard one: thousands of keep-alive clients in one
    process need thousands of descriptors, and 1024 is a common default."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
