"""What a user would otherwise pick to wait for a prediction in the triggerer (the benchmark's baselines).

``StatusHttpSensorTrigger``
    The http provider's ``HttpSensorTrigger`` (what ``HttpSensor(deferrable=True)`` defers to), at its
    default ``poke_interval`` of 5 s. As shipped it fires on the first answer that is not a 404, and a
    prediction's status URL answers 200 while the prediction runs; ``HttpSensor`` with a
    ``response_check`` does not defer at all, and ``HttpEventTrigger`` (which takes a
    ``response_check_path``) re-imports the check on every poll and is meant for asset watchers. So this
    subclass changes one thing only: a ``starting``/``processing`` status is "not yet", exactly like the
    404 branch of ``HttpSensorTrigger.run`` (sleep ``poke_interval``, ask again). Everything else is the
    provider's own I/O: one ``HttpAsyncHook`` per trigger, a new ``aiohttp.ClientSession`` (so a new TCP
    connection) for every poll, the hook's retries and connection handling. Reading the JSON body is the
    only extra work, and any status check needs it.

``FixedIntervalTrigger``
    The naive loop a user writes by hand: one keep-alive ``aiohttp.ClientSession`` per trigger, a GET every
    ``interval`` seconds (2 s: it notices as fast as ``PredictionTrigger`` while a prediction is young), no
    retries, no back-off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from airflow.providers.common.compat.sdk import AirflowException
from airflow.providers.http.triggers.http import HttpSensorTrigger
from airflow.triggers.base import BaseTrigger, TriggerEvent

NOT_YET = frozenset({"starting", "processing"})


class StatusHttpSensorTrigger(HttpSensorTrigger):
    """``HttpSensorTrigger`` that also treats a running prediction's status as "not yet"."""

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        return f"{type(self).__module__}.{type(self).__qualname__}", kwargs

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # HttpSensorTrigger.run (providers-http 6.3.0), plus the status check marked below.
        hook = self._get_async_hook()
        while True:
            try:
                async with aiohttp.ClientSession() as session:
                    response = await hook.run(
                        session=session,
                        endpoint=self.endpoint,
                        data=self.data,
                        headers=self.headers,
                        extra_options=self.extra_options,
                    )
                    body = await response.json(content_type=None)  # added: read the status
                if isinstance(body, dict) and body.get("status") in NOT_YET:  # added: "not yet"
                    await asyncio.sleep(self.poke_interval)
                    continue
                yield TriggerEvent(True)
                return
            except AirflowException as exc:
                if str(exc).startswith("404"):
                    await asyncio.sleep(self.poke_interval)


class FixedIntervalTrigger(BaseTrigger):
    """Poll ``<host>/replicate/v1/predictions/<id>`` every ``interval`` seconds over one keep-alive session.

    The host and the ``Authorization`` header come from an ``http`` connection (read once per trigger).
    """

    def __init__(self, prediction_id: str, http_conn_id: str, interval: float = 2.0) -> None:
        super().__init__()
        self.prediction_id = prediction_id
        self.http_conn_id = http_conn_id
        self.interval = float(interval)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"prediction_id": self.prediction_id, "http_conn_id": self.http_conn_id, "interval": self.interval},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow.providers.common.compat.connection import get_async_connection

        conn = await get_async_connection(self.http_conn_id)
        url = f"{conn.host.rstrip('/')}/replicate/v1/predictions/{self.prediction_id}"
        headers = {"Authorization": conn.extra_dejson["Authorization"]}
        async with aiohttp.ClientSession(headers=headers) as session:
            while True:
                try:
                    async with session.get(url) as response:
                        body = await response.json(content_type=None)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    body = None
                if isinstance(body, dict) and body.get("status") and body["status"] not in NOT_YET:
                    yield TriggerEvent({"status": body["status"], "prediction_id": self.prediction_id})
                    return
                await asyncio.sleep(self.interval)


class IdleTrigger(BaseTrigger):
    """The benchmark's floor: a trigger without any I/O that sleeps once, until ``lifetime`` seconds after
    ``started_at`` (the benchmark draws each lifetime from the same spread as the simulator's durations), and
    fires.

    What it costs is what any trigger pays anyway to be rebuilt, scheduled, woken once and finished by the
    triggerer, plus the harness's own ticking over the same run time: what a side costs above it is the cost
    of its waiting (its status checks, and its wake-ups for them).
    """

    def __init__(self, prediction_id: str, started_at: float, lifetime: float) -> None:
        super().__init__()
        self.prediction_id = prediction_id
        self.started_at = float(started_at)
        self.lifetime = float(lifetime)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "prediction_id": self.prediction_id,
                "started_at": self.started_at,
                "lifetime": self.lifetime,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await asyncio.sleep(max(0.0, self.started_at + self.lifetime - time.time()))
        yield TriggerEvent({"status": "idle", "prediction_id": self.prediction_id})
