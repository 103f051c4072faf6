"""Waiting for a batch's running predictions: in the triggerer (``PredictionBatchTrigger``) or in the worker.

Both follow the predictions with :class:`EndCollector`, on the connection's shared poller, where every
status answer goes through the one :class:`~airflow_comet.polling.PredictionPoller` decision (schedule,
errors, deadline), exactly as a single ``PredictionTrigger`` does. The collector hands back the predictions
that ended once enough have to be worth a refill; the task then persists them and creates the next items.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_comet.batch_state import ProgressLog, progress_line, slim_prediction
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.polling import DEADLINE_SLACK
from airflow_comet.triggers._shared_poller import Watch, shared_poller
from airflow_comet.triggers.prediction import PredictionTrigger

__all__ = ["EndCollector", "PredictionBatchTrigger"]

#: A progress line comes at least this often while predictions run (and at every tenth of the batch).
PROGRESS_EVERY = 30.0


class EndCollector:
    """The running predictions of a batch, followed on the shared poller until they end.

    :param conn_id: The CometAPI connection.
    :param poll_interval: The longest gap between two status checks of a prediction.
    :param end_time: Epoch deadline: every prediction still running then ends with a ``timeout`` event.
    """

    def __init__(self, conn_id: str, *, poll_interval: float, end_time: float | None) -> None:
        self._poller = shared_poller(conn_id)
        self._poll_interval = poll_interval
        self._end_time = end_time
        self._watches: dict[int, Watch] = {}
        self._pending: dict[asyncio.Future[Any], int] = {}

    def __len__(self) -> int:
        return len(self._watches)

    def __contains__(self, index: object) -> bool:
        return index in self._watches

    def follow(self, index: int, prediction_id: str, started_at: float) -> None:
        """Follow item ``index``'s prediction (its schedule counts from ``started_at``, its creation)."""
        watch = self._poller.follow(
            prediction_id, started_at, end_time=self._end_time, poll_interval=self._poll_interval, tell_changes=False
        )
        self._watches[index] = watch
        self._pending[watch.next_outcome()] = index

    async def wait(
        self,
        enough: int,
        hold: float | None = None,
        *,
        log: Any,
        on_progress: Callable[[int], None] | None = None,
        not_before: float | None = None,
    ) -> dict[int, dict[str, Any]]:
        """Wait until ``enough`` predictions ended (or all did), or ``hold`` seconds after the first ended, and
        in any case until the epoch ``not_before`` (``None``: no such floor; the batch's deadline lifts it);
        return ``{index: event}`` of those that ended (the events' predictions slimmed).

        ``on_progress(ended so far)`` is called after each end and at least every ``PROGRESS_EVERY`` seconds.
        """
        loop = asyncio.get_running_loop()
        ended: dict[int, dict[str, Any]] = {}
        first_end: float | None = None
        while self._pending:
            ready = len(ended) >= enough or (
                first_end is not None and hold is not None and loop.time() >= first_end + hold
            )
            early = not_before is not None and time.time() < not_before
            if ready and not early:
                break
            timeout = PROGRESS_EVERY
            if ready and not_before is not None:
                timeout = min(timeout, max(0.0, not_before - time.time()))
            elif first_end is not None and hold is not None:
                timeout = min(timeout, max(0.0, first_end + hold - loop.time()))
            done, _ = await asyncio.wait(self._pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                index = self._pending.pop(future)
                event = self._event(index, future, log)
                if event is not None:
                    ended[index] = event
            if ended and first_end is None:
                first_end = loop.time()
            if self._end_time is not None and time.time() >= self._end_time - DEADLINE_SLACK:
                # At the deadline every prediction still followed times out within a moment: take them all,
                # rather than a resume of the task for each.
                enough = len(ended) + len(self._pending)
                not_before = None
            if on_progress is not None:
                on_progress(len(ended))
        if not_before is not None and time.time() < not_before:
            await asyncio.sleep(not_before - time.time())  # everything ended early: still not sooner
        return ended

    def _event(self, index: int, future: asyncio.Future[Any], log: Any) -> dict[str, Any] | None:
        """The end event of the outcome in ``future``; ``None`` (and follows on) when the wait goes on."""
        watch = self._watches[index]
        event: dict[str, Any]
        try:
            outcome = future.result()
        except Exception as error:  # noqa: BLE001 - this item's wait failed; the others go on
            event = {
                "status": "error",
                "prediction_id": watch.prediction_id,
                "prediction": watch.last_prediction,
                "message": f"Waiting for prediction {watch.prediction_id} failed: {error}",
            }
        else:
            if outcome.event is None:
                if outcome.problem:
                    log.warning("Status check of prediction %s: %s", watch.prediction_id, outcome.problem)
                self._pending[watch.next_outcome()] = index
                return None
            event = outcome.event
        watch.close()
        del self._watches[index]
        return {**event, "prediction": slim_prediction(event.get("prediction"))}

    def close(self) -> None:
        """Stop following everything (idempotent)."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        for watch in self._watches.values():
            watch.close()
        self._watches.clear()


class PredictionBatchTrigger(PredictionTrigger):
    """
    Follow a batch's running predictions; fire once when enough of them ended to refill the batch.

    The event is ``{"status": "ended", "ended": [[index, event], ...], "state": state}``, each event as a
    ``PredictionTrigger``'s (``status``, ``prediction_id``, ``prediction``, ``message``), or ``{"status":
    "error", "message": ..., "state": state}`` when the wait itself failed.

    :param running: ``[index, prediction_id, created_epoch]`` of every running prediction.
    :param cometapi_conn_id: The CometAPI connection.
    :param poll_interval: The longest gap between two status checks of a prediction, in seconds.
    :param end_time: Epoch deadline of the batch: every prediction still running then ends ``timeout``.
    :param enough: Fire once this many predictions ended (or all of them did).
    :param hold: Fire at the latest this many seconds after the first prediction ended (``None``: no limit).
    :param cancel_on_kill: Cancel the running predictions when a person stops the task (Airflow >= 3.3).
    :param not_before: Epoch before which the trigger does not fire (``None``: no floor), see
        ``airflow_comet.operators.batch.MIN_DEFERRAL``.
    :param progress: Counts of the whole batch (``total``, ``succeeded``, ``failed``, ``waiting``,
        ``started_at``) for the progress lines.
    :param state: The task's own state between resumes, handed back in the event as it is. It travels with
        the trigger rather than in the deferral's kwargs because ``dag.test()`` (Airflow 2.11 and 3.3) drops
        those when a trigger fires; either way it ends up in the resumed task's ``next_kwargs``.
    """

    def __init__(
        self,
        running: list[list[Any]],
        cometapi_conn_id: str = CometAPIHook.default_conn_name,
        poll_interval: float = 20.0,
        end_time: float | None = None,
        enough: int = 1,
        hold: float | None = None,
        cancel_on_kill: bool = True,
        progress: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
        not_before: float | None = None,
    ) -> None:
        BaseTrigger.__init__(self)
        # [index, prediction_id, created_epoch] lists (not tuples), the form serialize() hands back.
        self.running: list[list[Any]] = [[int(index), str(pid), float(created)] for index, pid, created in running]
        self.cometapi_conn_id = cometapi_conn_id
        self.poll_interval = float(poll_interval)
        self.end_time = float(end_time) if end_time is not None else None
        self.enough = max(1, int(enough))
        self.hold = float(hold) if hold is not None else None
        self.cancel_on_kill = cancel_on_kill
        self.progress = dict(progress or {})
        self.state = state
        self.not_before = float(not_before) if not_before is not None else None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "running": self.running,
                "cometapi_conn_id": self.cometapi_conn_id,
                "poll_interval": self.poll_interval,
                "end_time": self.end_time,
                "enough": self.enough,
                "hold": self.hold,
                "cancel_on_kill": self.cancel_on_kill,
                "progress": self.progress,
                "state": self.state,
                "not_before": self.not_before,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        collector: EndCollector | None = None
        try:
            await self._check_connection()
            collector = EndCollector(self.cometapi_conn_id, poll_interval=self.poll_interval, end_time=self.end_time)
            for index, prediction_id, created in self.running:
                collector.follow(index, prediction_id, created)
            ended = await collector.wait(
                self.enough, self.hold, log=self.log, on_progress=self._progress_logger(), not_before=self.not_before
            )
            self.log.info("%d of %d running predictions ended; resuming the task", len(ended), len(self.running))
            yield TriggerEvent(
                {
                    "status": "ended",
                    "ended": [[index, event] for index, event in sorted(ended.items())],
                    "state": self.state,
                }
            )
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as error:
            self.log.exception("Waiting for the batch's predictions failed")
            message = f"Waiting for the batch's predictions failed: {error}"
            yield TriggerEvent({"status": "error", "message": message, "state": self.state})
        finally:
            if collector is not None:
                collector.close()

    def _progress_logger(self) -> Callable[[int], None]:
        counts = self.progress
        total = int(counts.get("total") or len(self.running))
        before = int(counts.get("succeeded", 0)) + int(counts.get("failed", 0))
        reporter = ProgressLog(total, every=PROGRESS_EVERY, last_at=time.time(), last_step=before * 10 // max(1, total))

        def report(ended_now: int) -> None:
            if reporter.due(before + ended_now, time.time()):
                line = progress_line(
                    total,
                    int(counts.get("succeeded", 0)),
                    int(counts.get("failed", 0)),
                    len(self.running) - ended_now,
                    int(counts.get("waiting", 0)),
                    time.time() - float(counts.get("started_at") or time.time()),
                )
                self.log.info("%s (%d ended since the last refill)", line, ended_now)

        return report

    def _cancelled_what(self) -> str:
        return f"the batch's {len(self.running)} running predictions"

    async def _cancel_if_stopped(self) -> None:
        state = await self._task_state()
        if state is None or state == "deferred":
            # As PredictionTrigger: a stale triggerer losing this trigger (apache/airflow#73454) must not
            # cancel a healthy batch.
            self.log.info("Not cancelling the batch's predictions: its task is %s.", state or "in an unknown state")
            return
        self.log.info("Task stopped (state %s); cancelling %s", state, self._cancelled_what())
        async with self._hook() as hook:
            answers = await asyncio.gather(
                *(hook.acancel_prediction(pid) for _, pid, _ in self.running), return_exceptions=True
            )
        for (_, pid, _), answer in zip(self.running, answers, strict=True):
            if isinstance(answer, BaseException):
                self.log.warning("Could not cancel prediction %s: %s", pid, answer)
            elif answer is not None:
                self.log.info("Cancelled prediction %s", pid)
