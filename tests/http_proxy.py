"""A small forward HTTP proxy on 127.0.0.1 for the tests: ``CONNECT`` tunnels, and absolute-form requests
relayed to the host they name. It records every byte clients sent through it, so a test can tell what the
proxy could read (a tunnelled TLS request must show no key), and can demand credentials (407 otherwise).
Given a TLS context it is an ``https://`` proxy (clients speak TLS to it, and through it to the host).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from urllib.parse import urlsplit


class HttpProxy:
    """``async with HttpProxy() as proxy``: ``proxy.url``, ``proxy.seen`` (bytes from clients, per connection),
    ``proxy.connects`` (the targets of CONNECT requests)."""

    def __init__(self, *, credentials: tuple[str, str] | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.credentials = credentials
        self.tls = tls
        self.seen: list[bytearray] = []
        self.connects: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> HttpProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        self.scheme = "https" if self.tls else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def url_with(self, user: str, password: str) -> str:
        return f"{self.scheme}://{user}:{password}@127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        seen = bytearray()
        self.seen.append(seen)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            seen += head
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if self.credentials and not self._authorized(head):
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            if method == "CONNECT":
                self.connects.append(target)
                host, port = target.rsplit(":", 1)
                up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                first = b""
            else:
                parts = urlsplit(target)
                up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
                first = head
            up_writer.write(first)
            await asyncio.gather(self._relay(reader, up_writer, seen), self._relay(up_reader, writer, None))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError, ValueError, ssl.SSLError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    def _authorized(self, head: bytes) -> bool:
        user, password = self.credentials  # type: ignore[misc]
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return f"proxy-authorization: basic {token}".lower().encode() in head.lower()

    @staticmethod
    async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: bytearray | None) -> None:
        try:
            while data := await reader.read(65536):
                if seen is not None:
                    seen += data
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()
