"""A raw TCP server on 127.0.0.1 that writes exact bytes: what HTTP/1.1 itself can do to a client (chunked and
close-delimited bodies, answers cut off, keep-alive connections closed under a request, garbage, TLS)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\": 1}\r\n"

# A handler gets (reader, writer, index of the connection) and serves that connection.
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawServer:
    """``asyncio.start_server`` on 127.0.0.1; counts connections and the requests it read."""

    def __init__(self, handler: Handler | None = None, tls: ssl.SSLContext | None = None) -> None:
        # No handler: every connection answers each of its requests with OK.
        self.handler, self.tls = handler, tls
        self.connections = 0
        self.requests: list[bytes] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        # Handlers still waiting on a connection end here, not in the loop's teardown.
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await (self.handler or (lambda r, w, i: self.keep_answering(r, w)))(reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
            0,
        )
        request = head + (await reader.readexactly(length) if length else b"")
        self.requests.append(request)
        return request

    async def keep_answering(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes = OK) -> None:
        while True:
            await self.read_request(reader)
            writer.write(answer)
            await writer.drain()
