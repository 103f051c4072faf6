"""PredictionSensor: wait for a CometAPI prediction to succeed (poke, reschedule or deferrable)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow import __version__ as AIRFLOW_VERSION
from airflow.providers.common.compat.sdk import (
    AirflowSensorTimeout,
    AirflowSkipException,
    BaseSensorOperator,
    conf,
)
from airflow.triggers.base import StartTriggerArgs

from airflow_comet.exceptions import CometAPIError, PredictionFailedError
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.links import PredictionLink
from airflow_comet.operators._waiting import PredictionWaitMixin
from airflow_comet.polling import PollOutcome, PredictionPoller, is_terminal
from airflow_comet.triggers.prediction import PredictionTrigger
from airflow_comet.validation import is_templated, validate_prediction_id

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

AIRFLOW_3_3_PLUS = tuple(int(part) for part in AIRFLOW_VERSION.split(".")[:2]) >= (3, 3)

#: Reschedule mode: the pause between re-asking within one poke to confirm an answer that counts towards
#: giving up (three such in a row fail the wait: a few seconds of a worker slot, once).
RESCHEDULE_CONFIRM_PAUSE = 1.0


class PredictionSensor(PredictionWaitMixin, BaseSensorOperator):
    """
    Wait until a prediction has succeeded; its XCom ``return_value`` is the final prediction object.

    Fails when the prediction ends ``failed``, ``canceled`` or ``aborted``, with the API's error text,
    unless ``fail_on_error=False``: then that prediction is the result too, so that a mapped pipeline
    persists every image that succeeded and decides at its end whether failures fail the run. In
    deferrable mode the wait runs in the triggerer and holds no worker slot; the trigger polls every
    1.7 s after creation at first and backs off towards ``poke_interval``.

    :param prediction_id: The prediction to wait for, usually ``create.output`` (templated).
    :param cometapi_conn_id: The CometAPI connection.
    :param deferrable: Wait in the triggerer (default ``[operators] default_deferrable``).
    :param cancel_on_kill: Cancel the prediction when the task is stopped or times out (in every mode).
    :param fail_on_error: Fail when the prediction ends ``failed``/``canceled``/``aborted``; with ``False``
        the task succeeds and returns that prediction (its ``status`` and ``error`` say what happened).
        A timeout or a wait that could not go on (unknown id, revoked key) fails the task either way.
    :param end_from_trigger: With ``deferrable``, let the trigger end the task (Airflow >= 2.10): the wait
        costs no second worker run. Airflow then skips ``on_success_callback``, refuses the DAG while a
        listener such as OpenLineage is registered, and (before 3.3) does not retry a task the trigger failed.
    :param start_from_trigger: Airflow >= 3.3, a task that is not mapped: the scheduler starts the trigger
        itself and no worker runs before the wait (with ``end_from_trigger``, none at all). ``prediction_id``
        must then be text: a Jinja template such as ``"{{ ti.xcom_pull(task_ids='create', map_indexes=-1) }}"``
        is rendered in the triggerer (3.3.2's triggerer cannot answer an ``xcom_pull`` without
        ``map_indexes``), an ``XComArg`` (``create.output``) is not. The ``timeout`` counts from the
        trigger's start.
    """

    template_fields: Sequence[str] = ("prediction_id",)
    ui_color = "#f0ecfd"
    operator_extra_links = (PredictionLink(),)
    # start_from_trigger (Airflow >= 3.3): what the scheduler starts instead of running execute().
    start_trigger_args = StartTriggerArgs(
        trigger_cls=f"{PredictionTrigger.__module__}.{PredictionTrigger.__qualname__}",
        trigger_kwargs={},
        next_method="execute_complete",
        next_kwargs=None,
        timeout=None,
    )
    start_from_trigger = False

    def __init__(
        self,
        *,
        prediction_id: str,
        cometapi_conn_id: str = CometAPIHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        cancel_on_kill: bool = True,
        fail_on_error: bool = True,
        end_from_trigger: bool = False,
        start_from_trigger: bool = False,
        poke_interval: float = 20.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(poke_interval=poke_interval, **kwargs)
        if not is_templated(prediction_id):
            validate_prediction_id(prediction_id)
        self.prediction_id = prediction_id
        self.cometapi_conn_id = cometapi_conn_id
        self.deferrable = deferrable
        self.cancel_on_kill = cancel_on_kill
        self.fail_on_error = fail_on_error
        self.end_from_trigger = end_from_trigger
        if start_from_trigger:
            self._start_from_trigger()
        self._poller: PredictionPoller | None = None

    def _start_from_trigger(self) -> None:
        if not AIRFLOW_3_3_PLUS:
            raise ValueError(
                "start_from_trigger needs Airflow >= 3.3 (older versions do not render prediction_id in the "
                "triggerer); use deferrable=True"
            )
        if not isinstance(self.prediction_id, str):
            raise ValueError(
                "start_from_trigger needs prediction_id as text, e.g. \"{{ ti.xcom_pull(task_ids='create', map_indexes=-1) }}\": an XComArg "
                f"(create.output) is resolved only in a worker, got {type(self.prediction_id).__name__}"
            )
        self.start_from_trigger = True
        self.start_trigger_args = dataclasses.replace(
            self.start_trigger_args,
            trigger_kwargs={
                # Named as the template field, so that the triggerer renders it (Airflow 3.3).
                "prediction_id": self.prediction_id,
                "cometapi_conn_id": self.cometapi_conn_id,
                "poll_interval": self.poll_interval,
                "cancel_on_kill": self.cancel_on_kill,
                "end_from_trigger": self.end_from_trigger,
                "fail_on_error": self.fail_on_error,
                "timeout": float(self.timeout) if self.timeout else None,
            },
        )

    @property
    def poll_interval(self) -> float:  # the name the shared waiting code uses
        return float(self.poke_interval)

    @cached_property
    def hook(self) -> CometAPIHook:
        return CometAPIHook(cometapi_conn_id=self.cometapi_conn_id)

    def execute(self, context: Context) -> Any:
        validate_prediction_id(self.prediction_id)
        if not self.deferrable:
            try:
                return super().execute(context)
            except (AirflowSensorTimeout, AirflowSkipException):
                # The sensor's own timeout (a skip with soft_fail): stop the prediction too, as the deferred
                # wait and the operator do; one that already ended needs nothing.
                last = (self._poller.last_prediction if self._poller else None) or {}
                if not last or not is_terminal(last):
                    self._cancel_on_kill(self.prediction_id)
                raise
        # Check once before deferring: a prediction that is already done needs no trigger.
        prediction = self.hook.get_prediction(self.prediction_id)
        poller = PredictionPoller(prediction_id=self.prediction_id, started_at=time.time())
        outcome = poller.on_prediction(prediction, time.time())
        if outcome.event is not None:
            return self._finish_and_link(context, outcome.event)
        end_time, is_task_timeout = self._deadline(context, float(self.timeout) if self.timeout else None)
        self.defer(
            trigger=self._trigger(prediction, end_time),
            method_name="execute_complete",
            kwargs={"deadline_is_task_timeout": is_task_timeout},
            timeout=None,
        )
        return None  # not reached: defer() raises

    def poke(self, context: Context) -> bool | Any:
        """One status check (poke and reschedule modes); transient errors only mean "not yet"."""
        validate_prediction_id(self.prediction_id)
        if self._poller is None:
            self._poller = PredictionPoller(prediction_id=self.prediction_id, started_at=time.time())
        while True:
            strikes = self._poller.strikes
            outcome = self._check(context)
            # In reschedule mode every poke runs in a new task instance: the answers-in-a-row the poller counts
            # before giving up (a wrong id, a revoked key, a wrong host) would start over each time and the
            # sensor would wait out its whole timeout. So such an answer is confirmed within this poke, for as
            # long as each answer adds one (a good answer or a transient error ends the poke as usual).
            if outcome.event is not None or not (self.reschedule and self._poller.strikes > strikes):
                break
            time.sleep(RESCHEDULE_CONFIRM_PAUSE)
        if outcome.event is None:
            return False
        if outcome.event["status"] == "error":
            raise PredictionFailedError(outcome.event["message"])
        # Returning the prediction through PokeReturnValue makes it the task's XCom return_value.
        from airflow.providers.common.compat.sdk import PokeReturnValue

        return PokeReturnValue(is_done=True, xcom_value=self._finish_and_link(context, outcome.event))

    def _check(self, context: Context) -> PollOutcome:
        """One status check and the poller's decision on it, logged."""
        assert self._poller is not None
        try:
            prediction = self.hook.get_prediction(self.prediction_id)
        except CometAPIError as error:
            outcome = self._poller.on_error(error, time.time())
            if outcome.event is None:
                self.log.warning("Status check of prediction %s failed (trying again): %s", self.prediction_id, error)
            return outcome
        outcome = self._poller.on_prediction(prediction, time.time())
        if outcome.problem:
            self.log.warning("Status check of prediction %s: %s", self.prediction_id, outcome.problem)
        else:
            self.log.info("Prediction %s is %s", self.prediction_id, prediction.get("status"))
        return outcome

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None, deadline_is_task_timeout: bool = False
    ) -> dict[str, Any]:
        """Resume after the trigger fired: return the prediction, or fail with the event's message."""
        return self._finish_and_link(context, event, deadline_is_task_timeout=deadline_is_task_timeout)

    def _finish_and_link(self, context: Context, event: Any, **kwargs: Any) -> dict[str, Any]:
        """``_finish``, then the link to the prediction's output once it has succeeded."""
        prediction = self._finish(event, **kwargs)
        self._push_link(context, prediction)
        return prediction

    def _retry_hint(self, *, cancelled: bool) -> str:
        return ""  # a sensor creates nothing, and its own timeout is not retried

    def _own_timeout_error(self, message: str) -> Exception:
        # The sensor's ``timeout`` passed while deferred: what poke mode raises too (no retry, soft_fail skips).
        return AirflowSensorTimeout(message)

    def on_kill(self) -> None:
        """Cancel the prediction (best effort) when the task is stopped in the worker."""
        if isinstance(self.prediction_id, str) and not is_templated(self.prediction_id):
            self._cancel_on_kill(self.prediction_id)
