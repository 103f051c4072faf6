"""A trigger that waits for a CometAPI prediction in the triggerer, without holding a worker slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_comet.exceptions import CometAPIConfigError, CometAPIError
from airflow_comet.hooks.cometapi import CometAPIHook, aconnection_settings
from airflow_comet.triggers._shared_poller import Watch, shared_poller

#: Pauses between the tries of a trigger's first connection lookup (see ``_check_connection``).
LOOKUP_PAUSES = (3.0, 9.0, 18.0)


class PredictionTrigger(BaseTrigger):
    """
    Poll a prediction until it is terminal; fire exactly one event.

    The event is a dict: ``status`` (one of succeeded, failed, canceled, timeout, error),
    ``prediction_id``, ``prediction`` (the last prediction object seen, or ``None``) and ``message``.

    :param prediction_id: The prediction to wait for.
    :param cometapi_conn_id: The CometAPI connection.
    :param poll_interval: The longest gap between two status checks, in seconds. The first checks come
        1.7 s apart (from creation) and the gap grows with the prediction's age.
    :param started_at: Epoch seconds when the prediction was created (drives the poll schedule).
    :param end_time: Epoch deadline; at it the trigger fires a ``timeout`` event (it does not cancel: the
        task's ``execute_complete`` does, so the failure and the cancel are reported together).
    :param cancel_on_kill: Cancel the prediction when a person stops the deferred task (Airflow >= 3.3).
    :param end_from_trigger: End the task from here instead of resuming it in a worker (no second worker
        run): success with the XComs below, or failure (a timeout cancels the prediction first). Airflow
        3.3 retries a task that a trigger failed; older versions do not.
    :param return_value: With ``end_from_trigger``, what the task returns: ``"prediction"`` (the
        sensor's contract) or ``"id"`` (the operator's, which also pushes the prediction under the
        XCom key ``prediction``).
    :param fail_on_error: With ``end_from_trigger``, fail the task for a prediction that ended
        ``failed``/``canceled`` (``False``: succeed with it as the result).
    :param timeout: Seconds from this trigger's start to its deadline, when no ``end_time`` is given (a
        sensor started from the triggerer knows no start time of its own).
    """

    def __init__(
        self,
        prediction_id: str,
        cometapi_conn_id: str = CometAPIHook.default_conn_name,
        poll_interval: float = 20.0,
        started_at: float | None = None,
        end_time: float | None = None,
        cancel_on_kill: bool = True,
        end_from_trigger: bool = False,
        return_value: str = "prediction",
        fail_on_error: bool = True,
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        self.prediction_id = prediction_id
        self.cometapi_conn_id = cometapi_conn_id
        self.poll_interval = float(poll_interval)
        self.started_at = float(started_at) if started_at is not None else time.time()
        self.end_time = float(end_time) if end_time is not None else None
        if self.end_time is None and timeout:
            self.end_time = time.time() + float(timeout)
        self.cancel_on_kill = cancel_on_kill
        if return_value not in ("prediction", "id"):
            raise ValueError(f"return_value must be 'prediction' or 'id', got {return_value!r}")
        self.end_from_trigger = end_from_trigger
        self.return_value = return_value
        self.fail_on_error = fail_on_error

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "prediction_id": self.prediction_id,
                "cometapi_conn_id": self.cometapi_conn_id,
                "poll_interval": self.poll_interval,
                "started_at": self.started_at,
                "end_time": self.end_time,
                "cancel_on_kill": self.cancel_on_kill,
                "end_from_trigger": self.end_from_trigger,
                "return_value": self.return_value,
                "fail_on_error": self.fail_on_error,
            },
        )

    def _hook(self) -> CometAPIHook:
        return CometAPIHook(cometapi_conn_id=self.cometapi_conn_id)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        watch: Watch | None = None
        try:
            # Looked up now rather than at the first check, which may be poll_interval away: a missing or
            # broken connection ends the wait within seconds (the lookup is shared with the loop's other hooks).
            await self._check_connection()
            # The status checks are sent by the connection's shared poller (one timer and a few workers for
            # every trigger of the triggerer); this task wakes only for what it logs or yields.
            watch = shared_poller(self.cometapi_conn_id).follow(
                self.prediction_id,
                self.started_at,
                end_time=self.end_time,
                poll_interval=self.poll_interval,
            )
            while True:
                outcome = await watch.next_outcome()
                if outcome.event is not None:
                    watch.close()
                    self.log.info(
                        "%s (%d status checks in %.0f s)",
                        outcome.event["message"],
                        watch.polls,
                        time.time() - self.started_at,
                    )
                    if self.end_from_trigger:
                        yield await self._end_task(outcome.event)
                    else:
                        yield TriggerEvent(outcome.event)
                    return
                if outcome.new_status:
                    self.log.info("Prediction %s is %s", self.prediction_id, outcome.new_status)
                elif outcome.problem:
                    self.log.warning("Status check of prediction %s: %s", self.prediction_id, outcome.problem)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as error:
            self.log.exception("Waiting for prediction %s failed", self.prediction_id)
            yield TriggerEvent(
                {
                    "status": "error",
                    "prediction_id": self.prediction_id,
                    "prediction": watch.last_prediction if watch is not None else None,
                    "message": f"Waiting for prediction {self.prediction_id} failed: {error}",
                }
            )
        finally:
            if watch is not None:
                watch.close()

    async def _end_task(self, event: dict[str, Any]) -> TriggerEvent:
        """The event that ends the task from the triggerer (``end_from_trigger``): what the operator's
        ``execute_complete`` would have decided, cancelling the prediction on a timeout first."""
        from airflow.triggers.base import TaskFailedEvent, TaskSuccessEvent

        status, prediction = event["status"], event.get("prediction")
        handed_on = status in ("failed", "canceled") and not self.fail_on_error
        if status == "succeeded" or (handed_on and prediction):
            if self.return_value == "id":
                return TaskSuccessEvent(xcoms={"return_value": self.prediction_id, "prediction": prediction})
            return TaskSuccessEvent(xcoms={"return_value": prediction})
        message = event["message"]
        if status == "timeout" and self.cancel_on_kill:
            message += " " + await self._cancel_after_timeout()
        self.log.error("%s", message)
        return TaskFailedEvent()

    async def _cancel_after_timeout(self) -> str:
        try:
            async with self._hook() as hook:
                answer = await hook.acancel_prediction(self.prediction_id)
        except CometAPIError as error:
            return f"Cancelling it failed ({error}); it may still be running and billing."
        if answer is None:
            return "CometAPI could not cancel it (no cancel endpoint); it may still be running and billing."
        return "It was cancelled."

    async def _check_connection(self) -> None:
        """Raise when the connection cannot be used, after a few tries over about half a minute.

        Airflow reports a secrets backend or an API server that cannot answer for a moment (a deployment
        restarting) as a missing connection, so "not found" is asked again, as anything else that is not a
        config error: a trigger started in that moment waits on instead of failing its task, and a
        connection that really is missing still ends the wait within the pauses below.
        """
        for pause in (*LOOKUP_PAUSES, None):
            try:
                await aconnection_settings(self.cometapi_conn_id)
                return
            except CometAPIConfigError:
                raise
            except Exception as error:
                if pause is None:
                    raise
                self.log.warning(
                    "Looking up connection %s failed (%s); asking again in %.0f s", self.cometapi_conn_id, error, pause
                )
                await asyncio.sleep(pause)

    async def on_kill(self) -> None:
        """Cancel the prediction when a person stopped the task (called by Airflow >= 3.3 only)."""
        if not self.cancel_on_kill:
            return
        # Airflow 3.3.2's triggerer cancels this trigger's task again at every state sync (about once a second)
        # until the trigger has finished, on_kill included: awaited here directly, the state check or the cancel
        # request would be cut short by the next of those cancels and the prediction left running. So the work
        # runs in a task of its own that those cancels do not reach, bounded by our own budget (below Airflow's
        # [triggerer] on_kill_timeout, whose own cancel could otherwise not be told apart from the repeats).
        work = asyncio.ensure_future(self._cancel_if_stopped())
        budget = _on_kill_budget()
        deadline = time.monotonic() + budget
        while not work.done() and time.monotonic() < deadline:
            try:
                await asyncio.wait({work}, timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.CancelledError:
                _uncancel()
        if not work.done():
            work.cancel()
            self.log.warning(
                "Gave up cancelling %s after %.0f s; it may still be running.", self._cancelled_what(), budget
            )
            return
        work.result()  # its error, if any, is logged by the triggerer

    def _cancelled_what(self) -> str:
        """What ``on_kill`` cancels, for its log lines (a subclass may follow several predictions)."""
        return f"prediction {self.prediction_id}"

    async def _cancel_if_stopped(self) -> None:
        state = await self._task_state()
        if state is None or state == "deferred":
            # Airflow 3.3.2 also calls on_kill when a stale triggerer loses this trigger to another one
            # (apache/airflow#73454): the task is still deferred and the prediction is healthy. When the state
            # cannot be read we cannot tell the two apart, and a healthy prediction is worth more than the
            # cost of letting a stopped one finish.
            self.log.info(
                "Not cancelling prediction %s: its task is %s.",
                self.prediction_id,
                "still deferred (the trigger moved to another triggerer)" if state else "in an unknown state",
            )
            return
        self.log.info("Task stopped (state %s); cancelling prediction %s", state, self.prediction_id)
        async with self._hook() as hook:
            answer = await hook.acancel_prediction(self.prediction_id)
        if answer is not None:  # None: no cancel endpoint, already logged by the hook
            self.log.info("Cancelled prediction %s", self.prediction_id)

    async def _task_state(self) -> str | None:
        """The task instance's current state, as the API server knows it (``None`` if unknown)."""
        ti = getattr(self, "task_instance", None)
        if ti is None:
            return None
        try:
            from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
            from asgiref.sync import sync_to_async

            map_index = getattr(ti, "map_index", -1)
            states = await sync_to_async(RuntimeTaskInstance.get_task_states)(
                dag_id=ti.dag_id, task_ids=[ti.task_id], run_ids=[ti.run_id], map_index=map_index
            )
        except Exception:
            self.log.warning("Could not read the state of task %s", getattr(ti, "task_id", "?"), exc_info=True)
            return None
        key = ti.task_id if map_index is None or map_index < 0 else f"{ti.task_id}_{map_index}"
        state = (states.get(ti.run_id) or {}).get(key)
        return str(getattr(state, "value", state)) if state is not None else None


def _on_kill_budget() -> float:
    """Seconds on_kill may spend: a little less than Airflow's ``[triggerer] on_kill_timeout`` (default 30)."""
    try:
        from airflow.providers.common.compat.sdk import conf

        limit = conf.getfloat("triggerer", "on_kill_timeout", fallback=30.0)
    except Exception:  # noqa: BLE001 - any config trouble: Airflow's default
        limit = 30.0
    return max(1.0, min(limit - 3.0, 25.0))


def _uncancel() -> None:
    """Take back a cancel request that was ridden out (Python >= 3.11 counts them; timeouts rely on it)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()
