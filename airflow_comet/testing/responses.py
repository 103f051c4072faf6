"""Answers shaped like CometAPI's: the JSON error envelope and the HTML pages its front ends send."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from aiohttp import web

__all__ = ["NOT_FOUND_HTML", "error_body", "error_response", "gateway_html", "html_page", "json_response"]


def error_body(message: str, code: str, param: str = "") -> dict[str, Any]:
    """CometAPI's error envelope; every message ends with a fresh request id, as the real one does."""
    return {
        "error": {
            "message": f"{message} (request id: {uuid.uuid4()})",
            "type": "comet_api_error",
            "param": param,
            "code": code,
        }
    }


def json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int, message: str, code: str, param: str = "", headers: Mapping[str, str] | None = None
) -> web.Response:
    return json_response(status, error_body(message, code, param), headers)


def html_page(status: int, html: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=html, content_type="text/html", headers=headers)


NOT_FOUND_HTML = (
    "<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
    "<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

MOVED_HTML = (
    "<html>\r\n<head><title>301 Moved Permanently</title></head>\r\n<body>\r\n"
    "<center><h1>301 Moved Permanently</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

CONSOLE_HTML = (
    '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>CometAPI</title></head>'
    '<body><div id="root">CometAPI console (simulated). The API lives under /replicate/v1/.</div></body></html>'
)

_REASONS = {
    200: "OK",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    520: "Web server is returning an unknown error",
    524: "A timeout occurred",
}


def gateway_html(status: int) -> str:
    """The kind of page a CDN or proxy in front of the API sends instead of JSON."""
    reason = _REASONS.get(status, "Error")
    return (
        f"<!DOCTYPE html><html><head><title>{status}: {reason}</title></head>"
        f"<body><h1>Error {status}</h1><p>{reason}</p><p>cloudflare</p></body></html>"
    )
