"""The API server: CometAPI's Replicate-format endpoints under ``/replicate/v1``, with fault injection."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from airflow_comet.testing.admin import add_admin_routes
from airflow_comet.testing.faults import Faults
from airflow_comet.testing.models import validate_input
from airflow_comet.testing.recording import ADMIN_PREFIX, ENDPOINT, MODEL, PREDICTION_ID, Handler, recorder
from airflow_comet.testing.responses import (
    CONSOLE_HTML,
    MOVED_HTML,
    NOT_FOUND_HTML,
    error_response,
    gateway_html,
    html_page,
    json_response,
)
from airflow_comet.testing.state import Prediction, SimulatorState

__all__ = ["API_PREFIX", "build_api_app", "parse_prefer_wait"]

API_PREFIX = "/replicate/v1"
_TERMINAL = ("succeeded", "failed", "canceled")
# Data-URI images ride in the JSON body; aiohttp's 1 MiB default would refuse realistic ones.
_MAX_BODY = 64 * 1024 * 1024


def parse_prefer_wait(header: str | None) -> int | None:
    """Seconds asked for by ``Prefer: wait=N`` (bare ``wait`` = 60), clamped to 1..60; else ``None``."""
    for token in (header or "").split(","):
        name, _, value = token.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        if not value.strip():
            return 60
        try:
            return min(60, max(1, int(value.strip())))
        except ValueError:
            return None  # like the real service, a malformed preference is just ignored
    return None


class _Api:
    def __init__(self, state: SimulatorState, api_key: str) -> None:
        self.state = state
        self.api_key = api_key

    # -- everything passes through here before a handler runs ----------------------------------
    @web.middleware
    async def gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith(ADMIN_PREFIX):
            return await handler(request)
        if path != API_PREFIX and not path.startswith(API_PREFIX + "/"):
            request[ENDPOINT] = "misrouted"
            return _misrouted(path)
        self._tag(request)
        problem = self._auth_problem(request.headers.get("Authorization"))
        if problem:
            return error_response(401, problem, "invalid_api_key")
        routing = request.match_info.http_exception
        if routing is not None:
            if routing.status == 405:
                return error_response(405, f"Method {request.method} not allowed for {path}", "method_not_allowed")
            return error_response(routing.status, f"Invalid URL ({request.method} {path})", "not_found")
        _, scope = self.state.faults_for(request.get(MODEL))
        if self.state.take_rate_limit(scope):
            return self._rate_limited(request.get(MODEL))
        return await handler(request)

    def _tag(self, request: web.Request) -> None:
        """Note endpoint, model and prediction id for the log and for per-model faults."""
        name = request.match_info.route.name
        request[ENDPOINT] = name or "unknown"
        info = request.match_info
        if name == "create":
            request[MODEL] = f"{info['owner']}/{info['name']}"
        elif name in ("status", "cancel"):
            request[PREDICTION_ID] = info["pid"]
            prediction = self.state.get(info["pid"])
            if prediction is not None:
                request[MODEL] = prediction.model

    def _auth_problem(self, header: str | None) -> str | None:
        if not header:
            return "Missing API key: send it as 'Authorization: Bearer <key>'"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.api_key:
            return "Invalid token"
        return None

    def _rate_limited(self, model: str | None) -> web.Response:
        faults, _ = self.state.faults_for(model)
        if faults.retry_after_http_date:
            from email.utils import formatdate

            retry = formatdate(time.time() + faults.retry_after, usegmt=True)
        else:
            retry = str(max(0, int(-(-faults.retry_after // 1))))  # whole seconds, rounded up
        return error_response(
            429, "Rate limit reached, please retry later", "rate_limit_exceeded", headers={"Retry-After": retry}
        )

    # -- endpoints ---------------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.StreamResponse:
        model = request[MODEL]
        spec = self.state.models.get(model)
        if spec is None:
            return error_response(404, f"Model {model} not found", "model_not_found")
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return error_response(400, "Request body is not valid JSON", "invalid_request", "input")
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            return error_response(400, "'input' is required and must be a JSON object", "invalid_request", "input")
        inputs = body["input"]
        problem = validate_input(spec, inputs)
        if problem:
            return error_response(400, problem[1], "invalid_request", problem[0])

        faults, scope = self.state.faults_for(model)
        if self.state.take_create_5xx(scope):
            return error_response(503, "Service temporarily unavailable", "service_unavailable")
        if faults.invalid_request_500:
            return error_response(500, "invalid request: upstream rejected the task", "invalid_request")

        prediction = self.state.create_prediction(model, inputs, faults)
        request[PREDICTION_ID] = prediction.id
        if faults.slow_create_seconds:
            await asyncio.sleep(faults.slow_create_seconds)
        wait = parse_prefer_wait(request.headers.get("Prefer"))
        if wait is not None:
            await self._wait(prediction, wait)
        # With Prefer: wait the answer is the full current object, as a later GET would give.
        body = prediction.to_api(time.monotonic(), self.state.delivery_url, full=wait is not None)
        return self._answer(201, body, faults, "create")

    async def status(self, request: web.Request) -> web.StreamResponse:
        prediction = self.state.get(request[PREDICTION_ID])
        if prediction is None:
            return error_response(404, "Prediction not found", "not_found")
        faults, _ = self.state.faults_for(prediction.model)
        if faults.slow_status_seconds:
            await asyncio.sleep(faults.slow_status_seconds)
        if self.state.draw(faults.poll_5xx_rate):
            return _server_error(self.state.choice(faults.poll_5xx_codes))
        return self._answer(200, prediction.to_api(time.monotonic(), self.state.delivery_url), faults, "status")

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        prediction = self.state.get(request[PREDICTION_ID])
        if prediction is None:
            return error_response(404, "Prediction not found", "not_found")
        faults, _ = self.state.faults_for(prediction.model)
        if faults.cancel_unsupported:
            return error_response(404, f"Invalid URL (POST {request.path})", "not_found")
        self.state.cancel(prediction)
        return self._answer(200, prediction.to_api(time.monotonic(), self.state.delivery_url), faults, "cancel")

    # -- helpers -------------------------------------------------------------------------------
    async def _wait(self, prediction: Prediction, seconds: float) -> None:
        """Hold until terminal or ``seconds`` pass; sleeps to the known end time, wakes on cancel."""
        deadline = time.monotonic() + seconds
        with self.state.lock:
            if prediction.changed is None:
                prediction.changed = asyncio.Event()
            changed = prediction.changed
        while True:
            now = time.monotonic()
            if now >= deadline or prediction.status(now) in _TERMINAL:
                return
            end = prediction.terminal
            until = deadline if end is None else min(deadline, end)
            try:
                # A hair past the end so the status computed next is already terminal.
                await asyncio.wait_for(changed.wait(), timeout=max(0.0, until - now) + 0.002)
            except asyncio.TimeoutError:
                pass

    def _answer(self, status: int, body: dict[str, Any], faults: Faults, endpoint: str) -> web.Response:
        """The JSON answer, spoiled as the body faults say for this endpoint."""
        if endpoint in faults.body_fault_endpoints:
            if self.state.draw(faults.html_rate):
                code = self.state.choice(faults.html_statuses)
                return html_page(code, CONSOLE_HTML if code == 200 else gateway_html(code))
            if self.state.draw(faults.truncated_json_rate):
                text = json.dumps(body)
                half = text[: len(text) // 2].encode()
                return web.Response(status=status, body=half, content_type="application/json")
            if faults.error_envelope_200:
                return error_response(200, "upstream error: the task could not be processed", "upstream_error")
            if faults.missing_fields or faults.unknown_status:
                body = dict(body)
                if faults.unknown_status:
                    body["status"] = faults.unknown_status
                for key in faults.missing_fields:
                    body.pop(key, None)
        return json_response(status, body)


def _server_error(code: int) -> web.Response:
    # The API itself answers 500/503 with its envelope; gateways in front of it (502/504/524) send HTML.
    if code == 500:
        return error_response(500, "Internal server error", "internal_error")
    if code == 503:
        return error_response(503, "Service temporarily unavailable", "service_unavailable")
    return html_page(code, gateway_html(code))


def _misrouted(path: str) -> web.Response:
    """What a base URL without ``/replicate`` (or a typo) meets: the web site's pages, not JSON."""
    if path == "/console":
        return html_page(200, CONSOLE_HTML)
    if path == "/" or path == "/v1" or path.startswith("/v1/"):
        return html_page(301, MOVED_HTML, headers={"Location": "/console"})
    return html_page(404, NOT_FOUND_HTML)


def build_api_app(state: SimulatorState, api_key: str) -> web.Application:
    api = _Api(state, api_key)
    app = web.Application(middlewares=[recorder(state, "api"), api.gate], client_max_size=_MAX_BODY)
    app.router.add_post(API_PREFIX + "/models/{owner}/{name}/predictions", api.create, name="create")
    app.router.add_get(API_PREFIX + "/predictions/{pid}", api.status, name="status", allow_head=False)
    app.router.add_post(API_PREFIX + "/predictions/{pid}/cancel", api.cancel, name="cancel")
    add_admin_routes(app, state)
    return app
