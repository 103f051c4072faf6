"""Waiting for a prediction, shared by the operator and the sensor: in the worker, or deferred."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowException, AirflowTaskTimeout

from airflow_comet.exceptions import CometAPIError, PredictionFailedError
from airflow_comet.hooks import _protocol as protocol
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.links import XCOM_PREDICTION_URL, prediction_link
from airflow_comet.polling import EVENT_STATUSES, PollOutcome, PredictionPoller
from airflow_comet.triggers.prediction import PredictionTrigger

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

#: XCom key of the final prediction object (the operator's ``return_value`` is always the id).
XCOM_PREDICTION = "prediction"
#: XCom key of the prediction a deferred task waits for, pushed before deferring (see ``pre_execute``).
XCOM_DEFERRED_PREDICTION_ID = "deferred_prediction_id"


class PredictionWaitMixin:
    """Follow a prediction to its end. Expects ``hook``, ``cometapi_conn_id``, ``poll_interval``,
    ``cancel_on_kill``, ``fail_on_error``, ``end_from_trigger``, ``execution_timeout`` and ``log`` on the class it is mixed into."""

    cometapi_conn_id: str
    cancel_on_kill: bool
    fail_on_error: bool
    end_from_trigger: bool
    #: What the task returns when its trigger ends it: the final ``"prediction"``, or its ``"id"``.
    _returns = "prediction"
    execution_timeout: timedelta | None
    log: Any

    if TYPE_CHECKING:
        # Only read here, so declared read-only: both classes hold the hook in a cached_property, and the
        # sensor derives poll_interval from poke_interval where the operator stores it.
        @property
        def hook(self) -> CometAPIHook: ...

        @property
        def poll_interval(self) -> float: ...

    # -- before waiting ---------------------------------------------------------------------------------

    def _deadline(self, context: Context, timeout: float | None) -> tuple[float | None, bool]:
        """The epoch deadline for the wait, and whether it is ``execution_timeout`` that sets it.

        Airflow 3.3.2 does not enforce ``execution_timeout`` while a task is deferred, so the trigger
        carries it too.
        """
        now = time.time()
        own = now + timeout if timeout else None
        task_deadline = None
        ti = context.get("ti")
        start = getattr(ti, "start_date", None)
        if self.execution_timeout and isinstance(start, datetime):
            task_deadline = start.timestamp() + self.execution_timeout.total_seconds()
        if task_deadline is not None and (own is None or task_deadline < own):
            return task_deadline, True
        return own, False

    def _push_link(self, context: Context, prediction: dict[str, Any]) -> None:
        """Push the "CometAPI prediction" link (``links.PredictionLink``) once ``prediction`` has succeeded:
        its first output file. Nothing before that or when it failed, so the UI shows no link then.

        Called with each prediction object the task learns of (after the create, and with the final one);
        Airflow 3 stores the link when the task stops, deferred or done, from what has been pushed by then.
        """
        link = prediction_link(prediction)
        if link:
            context["ti"].xcom_push(key=XCOM_PREDICTION_URL, value=link)

    def pre_execute(self, context: Context) -> None:
        super().pre_execute(context)  # type: ignore[misc]
        # Resuming after the trigger fired: know the prediction before execute_complete runs. Airflow 2 checks
        # execution_timeout against the first start on resume and, when it passed while the task was deferred,
        # raises AirflowTaskTimeout and calls on_kill without ever calling execute_complete: on_kill must then
        # know which prediction to cancel.
        ti = context.get("ti")
        kwargs = getattr(ti, "next_kwargs", None)
        event = kwargs.get("event") if isinstance(kwargs, dict) else None
        if isinstance(event, dict) and isinstance(event.get("prediction_id"), str):
            self.prediction_id = event["prediction_id"]
        elif getattr(ti, "next_method", None) and not getattr(self, "prediction_id", None):
            # Resumed without the trigger's event: Airflow 2's scheduler fails a deferred task whose
            # execution_timeout passed ("__fail__", next_kwargs replaced) when it gets there before the
            # trigger's own deadline event, or while no triggerer runs. on_kill still has to cancel.
            self.prediction_id = _deferred_prediction_id(ti)

    # -- waiting ----------------------------------------------------------------------------------------

    def _worker_poller(self, prediction: dict[str, Any], end_time: float | None) -> PredictionPoller:
        return PredictionPoller(
            prediction_id=prediction["id"],
            started_at=created_epoch(prediction),
            end_time=end_time,
            poll_interval=self.poll_interval,
        )

    def _wait_in_worker(self, prediction: dict[str, Any], end_time: float | None) -> dict[str, Any]:
        """Poll from the worker until the prediction is done; returns the final event."""
        poller = self._worker_poller(prediction, end_time)
        outcome = poller.on_prediction(prediction, time.time())
        if outcome.event is None:
            # The create answer was the first status: the next check follows the schedule's first poll.
            outcome = PollOutcome(delay=poller.first_delay(time.time()))
        while outcome.event is None:
            time.sleep(outcome.delay)
            try:
                latest = self.hook.get_prediction(prediction["id"])
            except CometAPIError as error:
                self.log.warning("Status check of prediction %s failed: %s", prediction["id"], error)
                outcome = poller.on_error(error, time.time())
            else:
                outcome = poller.on_prediction(latest, time.time())
                if outcome.problem:
                    self.log.warning("Status check of prediction %s: %s", prediction["id"], outcome.problem)
            if outcome.new_status:
                self.log.info("Prediction %s is %s", prediction["id"], outcome.new_status)
        return outcome.event

    def _trigger(self, prediction: dict[str, Any], end_time: float | None) -> PredictionTrigger:
        return PredictionTrigger(
            prediction_id=prediction["id"],
            cometapi_conn_id=self.cometapi_conn_id,
            poll_interval=self.poll_interval,
            started_at=created_epoch(prediction),
            end_time=end_time,
            cancel_on_kill=self.cancel_on_kill,
            end_from_trigger=self.end_from_trigger,
            return_value=self._returns,
            fail_on_error=self.fail_on_error,
        )

    # -- after waiting ----------------------------------------------------------------------------------

    def _finish(self, event: Any, *, deadline_is_task_timeout: bool = False) -> dict[str, Any]:
        """Return the succeeded prediction, or raise with the event's message (cancelling on timeout).

        With ``fail_on_error=False`` a prediction that ended ``failed``, ``canceled`` or ``aborted`` is
        returned too: the run's last task then decides whether failures fail it.
        """
        if not isinstance(event, dict) or event.get("status") not in EVENT_STATUSES:
            raise AirflowException(f"Unexpected event from the CometAPI trigger: {event!r}")
        status = event["status"]
        prediction_id = event.get("prediction_id")
        prediction = event.get("prediction") or {}
        message = event.get("message") or f"Prediction {prediction_id} ended {status}"
        self._log_result(prediction)
        if status == "succeeded":
            return prediction
        if status == "timeout":
            message += " " + self._cancel_after_timeout(prediction_id)
            if deadline_is_task_timeout:
                raise AirflowTaskTimeout(message)
            raise self._own_timeout_error(message)
        if status in protocol.FAILED_STATUSES and not self.fail_on_error:
            self.log.warning("%s; handed on as the result (fail_on_error=False)", message)
            return prediction or {"id": prediction_id, "status": status, "error": event.get("message")}
        raise PredictionFailedError(message)

    def _cancel_after_timeout(self, prediction_id: str | None) -> str:
        if not prediction_id:
            return ""
        if not self.cancel_on_kill:
            return "It was left running (cancel_on_kill=False)." + self._retry_hint(cancelled=False)
        try:
            answer = self.hook.cancel_prediction(prediction_id)
        except CometAPIError as error:
            return f"Cancelling it failed ({error}); it may still be running and billing."
        # Raising AirflowTaskTimeout makes Airflow call on_kill next: it need not ask a second time.
        self._cancelled_prediction_id = prediction_id
        if answer is None:  # no cancel endpoint (CometAPI does not document one): logged by the hook
            return (
                "CometAPI could not cancel it (no cancel endpoint); it may still be running and billing."
                + self._retry_hint(cancelled=False)
            )
        return "It was cancelled." + self._retry_hint(cancelled=True)

    def _retry_hint(self, *, cancelled: bool) -> str:
        """What a retry of this task does after a timeout (the operator's; a sensor creates nothing)."""
        if cancelled:
            return " A retry of this task creates a new prediction."
        return " A retry of this task resumes it where it can."

    def _own_timeout_error(self, message: str) -> Exception:
        """The error for a deadline of the wait's own (not ``execution_timeout``); the sensor's differs."""
        return PredictionFailedError(message)

    def _log_result(self, prediction: dict[str, Any]) -> None:
        if not prediction:
            return
        metrics = prediction.get("metrics") or {}
        self.log.info(
            "Prediction %s ended %s (predict_time=%s s, image_count=%s, outputs=%d)",
            prediction.get("id"),
            prediction.get("status"),
            metrics.get("predict_time"),
            metrics.get("image_count"),
            len(prediction.get("output") or []) if isinstance(prediction.get("output"), list) else 0,
        )
        logs = prediction.get("logs")
        if isinstance(logs, str) and logs.strip():
            self.log.info("Prediction logs:\n%s", logs.strip()[-4000:])

    # -- stopping ---------------------------------------------------------------------------------------

    def _cancel_on_kill(self, prediction_id: str | None) -> None:
        if not (self.cancel_on_kill and prediction_id):
            return
        if prediction_id == getattr(self, "_cancelled_prediction_id", None):
            return
        try:
            answer = self.hook.cancel_prediction(prediction_id)
        except Exception as error:  # noqa: BLE001 - on_kill is best effort
            self.log.warning("Could not cancel prediction %s: %s", prediction_id, error)
            return
        if answer is not None:  # None: no cancel endpoint, already logged by the hook
            self.log.info("Cancelled prediction %s", prediction_id)


def _deferred_prediction_id(ti: Any) -> str | None:
    """The id this task instance pushed before deferring (its own XCom, kept across the resume)."""
    try:
        value = ti.xcom_pull(task_ids=ti.task_id, key=XCOM_DEFERRED_PREDICTION_ID, map_indexes=ti.map_index)
    except Exception:  # noqa: BLE001 - best effort: on_kill then has nothing to cancel, as before
        return None
    return value if isinstance(value, str) else None


def created_epoch(prediction: dict[str, Any]) -> float:
    """The prediction's ``created_at`` as epoch seconds (now when absent or unreadable)."""
    created = protocol.iso_epoch(prediction.get("created_at"))
    # A server clock ahead of ours would make the schedule poll too fast at first: trust ours then.
    if created is not None and created <= time.time() + 60:
        return created
    return time.time()
