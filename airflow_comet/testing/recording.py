"""aiohttp middleware that writes every answered request into the simulator's request log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from airflow_comet.testing.state import RequestRecord, SimulatorState

if TYPE_CHECKING:
    from aiohttp.typedefs import Middleware

__all__ = ["ADMIN_PREFIX", "ENDPOINT", "MODEL", "PREDICTION_ID", "recorder"]

#: Admin endpoints live here on the API server and are never recorded.
ADMIN_PREFIX = "/_simulator/"

# Typed request-storage keys where aiohttp has them (3.12+), plain strings on older versions.
_RequestKey = getattr(web, "RequestKey", None)
ENDPOINT: Any = _RequestKey("sim_endpoint", str) if _RequestKey else "sim_endpoint"
PREDICTION_ID: Any = _RequestKey("sim_pid", str) if _RequestKey else "sim_pid"
MODEL: Any = _RequestKey("sim_model", str) if _RequestKey else "sim_model"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def recorder(state: SimulatorState, server: str) -> Middleware:
    """Outermost middleware: handlers tag the request (ENDPOINT, PREDICTION_ID, MODEL)
    and this records it once the status is known, whatever way the handler ended."""
    skip_admin = server == "api"

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if skip_admin and request.path.startswith(ADMIN_PREFIX):
            return await handler(request)
        arrived = time.time()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499  # the client hung up before we answered (nginx's code for it)
            raise
        finally:
            state.record(
                RequestRecord(
                    time=arrived,
                    server=server,
                    method=request.method,
                    path=request.path,
                    query=request.query_string,
                    headers=dict(request.headers),
                    status=status,
                    endpoint=request.get(ENDPOINT, "unknown"),
                    prediction_id=request.get(PREDICTION_ID),
                    model=request.get(MODEL),
                )
            )

    return record
