"""The delivery server: a second host, like the CDN that serves CometAPI's output files.

It takes no credentials at all (tests assert the API key never arrives here), answers the prediction
``urls.*`` links harmlessly (tests assert nobody follows them), and can spoil downloads on request.
"""

from __future__ import annotations

import asyncio
import functools
import time

from aiohttp import web

from airflow_comet.testing.images import CONTENT_TYPES, image_size, render_image
from airflow_comet.testing.recording import ENDPOINT, MODEL, PREDICTION_ID, recorder
from airflow_comet.testing.responses import json_response
from airflow_comet.testing.state import Prediction, SimulatorState

__all__ = ["build_delivery_app"]

_CACHE_FILES = 256
_CHUNK = 64 * 1024
_ZEROS = bytes(_CHUNK)
# Paths that only appear in a prediction's urls.*: a request here means a client followed one.
_FOLLOWED = ("/v1/predictions/", "/v1/files/stream/", "/p/")
_UNAUTHENTICATED = {
    "title": "Unauthenticated",
    "detail": "You did not pass a valid authentication token",
    "status": 401,
}


class _Delivery:
    def __init__(self, state: SimulatorState) -> None:
        self.state = state

    async def file(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        pid, index, ext = info["pid"], int(info["index"]), info["ext"]
        request[ENDPOINT] = "file"
        request[PREDICTION_ID] = pid
        prediction = self.state.get(pid)
        if (
            prediction is None
            or prediction.status(time.monotonic()) != "succeeded"
            or index >= prediction.num_outputs
            or ext != prediction.output_format
        ):
            return _not_found()
        request[MODEL] = prediction.model
        faults, _ = self.state.faults_for(prediction.model)
        if faults.file_404:
            return _not_found()
        try:
            data = await self._image(prediction, index)
        except RuntimeError as exc:  # no Pillow: say so rather than serve something fake
            return web.Response(status=500, text=str(exc))
        content_type = faults.file_content_type or CONTENT_TYPES[ext]
        if faults.file_size_bytes is not None:
            return await _stream(request, data, content_type, faults.file_size_bytes)
        if faults.file_truncated:
            return await _truncated(request, data, content_type)
        return web.Response(body=data, headers={"Content-Type": content_type})

    async def other(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith(_FOLLOWED):
            request[ENDPOINT] = "followed_url"
            # What the real links answer to a CometAPI key: they belong to another service.
            return json_response(401, _UNAUTHENTICATED)
        request[ENDPOINT] = "unknown"
        return _not_found()

    async def _image(self, prediction: Prediction, index: int) -> bytes:
        key = (prediction.id, index)
        with self.state.lock:
            cached = self.state.images.get(key)
            if cached is not None:
                self.state.images.move_to_end(key)
                return cached
        inputs = prediction.input
        width, height = image_size(inputs.get("aspect_ratio"))
        image_ref = inputs.get("input_image")
        note = ""
        if isinstance(image_ref, str):
            note = "edit of " + ("data: URI" if image_ref.startswith("data:") else image_ref[:60])
        render = functools.partial(
            render_image,
            str(inputs.get("prompt") or ""),
            width=width,
            height=height,
            output_format=prediction.output_format,
            quality=int(inputs.get("output_quality", 80)),
            index=index,
            note=note,
        )
        # Encoding takes milliseconds of CPU: keep it off the loop that serves thousands of pollers.
        data = await asyncio.get_running_loop().run_in_executor(None, render)
        with self.state.lock:
            self.state.images[key] = data
            while len(self.state.images) > _CACHE_FILES:
                self.state.images.popitem(last=False)
        return data


def _not_found() -> web.Response:
    return json_response(404, {"detail": "Not found."})


async def _stream(request: web.Request, data: bytes, content_type: str, size: int) -> web.StreamResponse:
    """Exactly ``size`` bytes (the image, then zeros), written chunk by chunk so nothing big is held."""
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.content_length = size
    await response.prepare(request)
    if request.method != "HEAD":
        head = data[:size]
        await response.write(head)
        left = size - len(head)
        while left > 0:
            n = min(left, _CHUNK)
            await response.write(_ZEROS if n == _CHUNK else _ZEROS[:n])
            left -= n
    await response.write_eof()
    return response


async def _truncated(request: web.Request, data: bytes, content_type: str) -> web.StreamResponse:
    """Promise ``len(data)`` bytes, send half, then drop the connection."""
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.content_length = len(data)
    await response.prepare(request)
    if request.method != "HEAD":
        await response.write(data[: len(data) // 2])
        request.protocol.force_close()
        if request.transport is not None:
            request.transport.close()  # flushes what was written, then closes
    return response


def build_delivery_app(state: SimulatorState) -> web.Application:
    delivery = _Delivery(state)
    app = web.Application(middlewares=[recorder(state, "delivery")])
    app.router.add_get(r"/v1/files/{pid}/{index:\d+}.{ext:[a-z]+}", delivery.file)
    app.router.add_route("*", "/{tail:.*}", delivery.other)
    return app
