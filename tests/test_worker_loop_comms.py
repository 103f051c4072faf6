"""A batch running in its worker talks to Airflow's supervisor through the task SDK's real comms (a socket
here, answered by a thread standing in for the supervisor): a connection lookup still in flight when the
batch's event loop stops between rounds must not leave the next blocking call waiting forever.

This is how the deferrable=False batch hung on a real deployment: the task SDK's ``asend`` takes the comms
lock in an executor thread and gives it back only when its coroutine runs again, which a stopped loop never
does, while the batch's next step (a blocking connection lookup) waited for that lock.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest

from airflow_comet.hooks._per_loop import new_worker_loop
from airflow_comet.hooks.cometapi import CometAPIHook

pytest.importorskip("airflow.sdk.execution_time.comms", reason="the task SDK's comms exist from Airflow 3")

from airflow.sdk.execution_time import task_runner
from airflow.sdk.execution_time.comms import (
    CommsDecoder,
    ConnectionResult,
    _RequestFrame,
    _ResponseFrame,
)

CONN_ID = "comms_test"
#: How long the fake supervisor takes to answer a connection lookup: the window in which the loop stops.
ANSWER_AFTER = 0.5


class FakeSupervisor(threading.Thread):
    """Answers the task's requests on its end of the socket as Airflow's supervisor does: a connection for
    ``GetConnection`` (after ``ANSWER_AFTER`` seconds), an empty frame for anything else."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.requests: list[str] = []

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def run(self) -> None:
        import msgspec

        decoder = msgspec.msgpack.Decoder(_RequestFrame)
        try:
            while True:
                frame = decoder.decode(self._read(int.from_bytes(self._read(4), "big")))
                kind = (frame.body or {}).get("type", "")
                self.requests.append(kind)
                body: dict[str, Any] | None = None
                if kind == "GetConnection":
                    time.sleep(ANSWER_AFTER)
                    result = ConnectionResult(
                        conn_id=CONN_ID,
                        conn_type="cometapi",
                        host="127.0.0.1",
                        schema=None,
                        login=None,
                        password="comms-key",
                        port=9,
                        extra=None,
                    )
                    body = result.model_dump(by_alias=True)
                self.sock.sendall(_ResponseFrame(id=frame.id, body=body).as_bytes())
        except (EOFError, OSError):
            return


@pytest.fixture
def supervisor(monkeypatch: pytest.MonkeyPatch):
    ours, theirs = socket.socketpair()
    fake = FakeSupervisor(theirs)
    fake.start()
    monkeypatch.delenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", raising=False)
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", CommsDecoder(socket=ours), raising=False)
    yield fake
    ours.close()
    theirs.close()


def blocking_lookup_within(seconds: float) -> Any:
    """The settings a fresh hook looks up with the blocking call, or ``None`` if that takes longer."""
    found: list[Any] = []
    thread = threading.Thread(target=lambda: found.append(CometAPIHook(CONN_ID).settings), daemon=True)
    thread.start()
    thread.join(seconds)
    return found[0] if found else None


def test_a_lookup_in_flight_when_the_worker_loop_stops_does_not_block_the_next_blocking_call(supervisor):
    loop = new_worker_loop()
    try:

        async def start_a_lookup() -> asyncio.Future[Any]:
            # As the batch's shared poller does when its settings expire, in the middle of a round.
            lookup = asyncio.ensure_future(CometAPIHook(CONN_ID).aget_settings())
            await asyncio.sleep(ANSWER_AFTER / 5)  # the request is on its way, its answer is not
            return lookup

        lookup = loop.run_until_complete(start_a_lookup())
        assert not lookup.done()
        # The loop is stopped, as between the batch's rounds: the worker's next step is a blocking lookup.
        settings = blocking_lookup_within(ANSWER_AFTER * 10)
        assert settings is not None, "the blocking lookup waited for the stopped loop's lookup"
        assert settings.api_key == "comms-key"
        assert loop.run_until_complete(lookup).api_key == "comms-key"
    finally:
        loop.close()
    assert supervisor.requests.count("GetConnection") == 2
