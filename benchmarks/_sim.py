"""The CometAPI simulator in its own process (``python -m airflow_comet.testing``), read through its admin
endpoints, so that its CPU never counts as the triggers'."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from typing import Any

import aiohttp

_LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


class SimProcess:
    def __init__(self, api_key: str, faults: dict[str, Any], seed: int = 0) -> None:
        self.api_key = api_key
        self.faults = faults
        self.seed = seed
        self.proc: asyncio.subprocess.Process | None = None
        self.base_url = ""

    async def start(self) -> SimProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "airflow_comet.testing",
            "--port",
            "0",
            "--api-key",
            self.api_key,
            "--seed",
            str(self.seed),
            "--faults",
            json.dumps(self.faults),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=60)
        found = _LISTENING.search(line.decode())
        if not found:
            raise RuntimeError(f"the simulator did not start: {line!r}")
        self.base_url = found.group(1)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def admin(self, name: str, **query: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"{self.base_url}/_simulator/{name}", params=query) as response:
                response.raise_for_status()
                return await response.json()

    def connection_env(self) -> dict[str, str]:
        """``AIRFLOW_CONN_CB`` (CometAPI) and ``AIRFLOW_CONN_HB`` (http, key in a header) for this simulator."""
        return {
            "AIRFLOW_CONN_CB": json.dumps({"conn_type": "cometapi", "password": self.api_key, "host": self.base_url}),
            "AIRFLOW_CONN_HB": json.dumps(
                {"conn_type": "http", "host": self.base_url, "extra": {"Authorization": f"Bearer {self.api_key}"}}
            ),
        }

    async def create_predictions(self, n: int, model: str = "black-forest-labs/flux-schnell") -> list[str]:
        """Start ``n`` predictions of ``model``, one after another; their ids."""
        ids = []
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.api_key}"}) as session:
            for _ in range(n):
                url = f"{self.base_url}/replicate/v1/models/{model}/predictions"
                async with session.post(url, json={"input": {"prompt": "x"}}) as response:
                    ids.append((await response.json())["id"])
        return ids

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=20)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
