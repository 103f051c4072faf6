"""Admin endpoints under ``/_simulator/`` so a simulator in another process can be steered and read.

They need no API key, answer only loopback clients, and are never written to the request log.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from airflow_comet.testing.faults import Faults
from airflow_comet.testing.responses import error_response, json_response
from airflow_comet.testing.state import SimulatorState

__all__ = ["add_admin_routes"]

_LOOPBACK = ("127.0.0.1", "::1")


def add_admin_routes(app: web.Application, state: SimulatorState) -> None:
    def loopback_only(
        handler: Callable[[web.Request], Awaitable[web.Response]],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def guarded(request: web.Request) -> web.Response:
            if request.remote not in _LOOPBACK:
                return error_response(403, "simulator admin endpoints answer loopback clients only", "forbidden")
            return await handler(request)

        return guarded

    async def set_faults(request: web.Request) -> web.Response:
        try:
            data = json.loads(await request.read() or b"{}")
            faults = Faults.from_dict(data)
        except (ValueError, TypeError) as exc:
            return error_response(400, f"bad faults: {exc}", "invalid_request", "faults")
        state.set_faults(faults)
        return json_response(200, {"faults": faults.to_dict()})

    async def get_faults(request: web.Request) -> web.Response:
        return json_response(200, {"faults": state.faults.to_dict()})

    async def requests(request: web.Request) -> web.Response:
        with state.lock:
            entries = list(state.log)
        for key in ("server", "endpoint", "prediction_id", "method"):
            if key in request.query:
                entries = [e for e in entries if getattr(e, key) == request.query[key]]
        return json_response(200, {"requests": [e.to_dict() for e in entries]})

    async def reset(request: web.Request) -> web.Response:
        state.reset()
        return json_response(200, {"reset": True})

    async def predictions(request: web.Request) -> web.Response:
        with state.lock:
            items = [state.describe(p) for p in state.predictions.values()]
        return json_response(200, {"predictions": items})

    async def stats(request: web.Request) -> web.Response:
        with state.lock:
            body = {
                "requests": len(state.log),
                "predictions": len(state.predictions),
                "connections_opened": dict(state.connections),
                "max_requests_per_second": max(state.per_second.values(), default=0),
            }
        return json_response(200, body)

    routes = (
        ("POST", "faults", set_faults),
        ("GET", "faults", get_faults),
        ("GET", "requests", requests),
        ("POST", "reset", reset),
        ("GET", "predictions", predictions),
        ("GET", "stats", stats),
    )
    for method, name, handler in routes:
        app.router.add_route(method, f"/_simulator/{name}", loopback_only(handler))
