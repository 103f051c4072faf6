"""A tiny real HTTP server on 127.0.0.1 that answers from a script, for exact retry-taxonomy tests.

The simulator plays CometAPI faithfully; this one plays exactly the answers a test lists, in order.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Answer:
    status: int = 200
    body: Any = None  # dict/list -> JSON, str/bytes -> as is
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (read-timeout tests)
    content_type: str | None = None


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class ScriptedServer:
    """Answers each request with the next scripted ``Answer``; the last one repeats."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.seen: list[Seen] = []
        self.connections = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server.connections += 1

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with server._lock:
                    server.seen.append(Seen(self.command, self.path, dict(self.headers), body, time.time()))
                    answer = server.answers.pop(0) if len(server.answers) > 1 else server.answers[0]
                if answer.delay:
                    time.sleep(answer.delay)
                if isinstance(answer.body, (dict, list)):
                    payload = json.dumps(answer.body).encode()
                    content_type = answer.content_type or "application/json"
                elif isinstance(answer.body, str):
                    payload = answer.body.encode()
                    content_type = answer.content_type or "text/html; charset=utf-8"
                else:
                    payload = answer.body or b""
                    content_type = answer.content_type or "application/octet-stream"
                try:
                    self.send_response(answer.status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    for key, value in answer.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def script(self, *answers: Answer) -> None:
        with self._lock:
            self.answers = list(answers)
            self.seen = []

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def prediction(pid: str = "p1", status: str = "starting", **extra: Any) -> dict[str, Any]:
    """A prediction object shaped like CometAPI's."""
    body = {
        "id": pid,
        "model": "black-forest-labs/flux-schnell",
        "version": "hidden",
        "input": {"prompt": "a paper boat"},
        "logs": "",
        "output": None,
        "data_removed": False,
        "error": None,
        "source": "api",
        "status": status,
        "created_at": "2026-03-12T11:27:18.258Z",
        "urls": {
            "get": f"https://api.replicate.com/v1/predictions/{pid}",
            "cancel": f"https://api.replicate.com/v1/predictions/{pid}/cancel",
            "web": f"https://replicate.com/p/{pid}",
        },
    }
    body.update(extra)
    return body


def envelope(message: str, code: str = "", status_type: str = "comet_api_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": status_type, "param": "", "code": code}}
