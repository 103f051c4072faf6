"""CreatePredictionOperator: start a CometAPI prediction, and optionally wait for it."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import BaseOperator, conf

from airflow_comet import resume
from airflow_comet.exceptions import CometAPINotFoundError, CometAPIResponseError, CometAPIRetryLaterError
from airflow_comet.file_inputs import FILE_INPUT_KEYS, file_input_paths, resolve_file_inputs
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.links import PredictionLink
from airflow_comet.operators._waiting import XCOM_DEFERRED_PREDICTION_ID, XCOM_PREDICTION, PredictionWaitMixin
from airflow_comet.polling import is_terminal
from airflow_comet.validation import (
    is_templated,
    validate_input,
    validate_model,
    validate_prefer_wait,
)

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

#: A deferrable create that CometAPI asks to wait longer than this (429 ``Retry-After``) waits in the
#: triggerer instead of its worker: a rate-limit storm must not hold every worker slot.
LONGEST_SLEEP_IN_WORKER = 5.0
#: How many times in a row one task waits out a ``Retry-After`` in the triggerer before the 429 fails it.
MAX_CREATE_WAITS = 20


class CreatePredictionOperator(PredictionWaitMixin, BaseOperator):
    """
    Start a prediction of a CometAPI model; its XCom ``return_value`` is always the prediction id.

    With ``wait_for_completion`` the task also waits for the prediction to end (in the triggerer when
    ``deferrable``), fails if it did not succeed (unless ``fail_on_error=False``), and pushes the final prediction object under the XCom key
    ``prediction``. On Airflow 3.3 the id is kept in the task state store, so a retry resumes a prediction
    that is still running or already succeeded instead of paying for a new one.

    :param model: ``owner/name``, e.g. ``black-forest-labs/flux-schnell`` (templated).
    :param input: The model's parameters, e.g. ``{"prompt": ..., "aspect_ratio": "1:1"}``; Jinja renders
        inside nested values (templated).
    :param cometapi_conn_id: The CometAPI connection.
    :param wait_for_completion: Wait for the prediction to end before the task succeeds.
    :param deferrable: Wait in the triggerer, freeing the worker slot (default ``[operators]
        default_deferrable``).
    :param poll_interval: Longest gap between status checks, in seconds; the first come under two seconds
        apart.
    :param timeout: Seconds to wait for the prediction before failing and cancelling it (``None``: no
        limit besides ``execution_timeout``).
    :param prefer_wait: Ask CometAPI to hold the create answer up to this many seconds (``Prefer: wait``,
        1-60) so a fast prediction comes back done without any poll; harmless where it is ignored.
    :param cancel_on_kill: Cancel the prediction when the task is stopped or times out.
    :param fail_on_error: With ``wait_for_completion``, fail when the prediction ends ``failed``,
        ``canceled`` or ``aborted``; with ``False`` the task succeeds and the ``prediction`` XCom says how
        it ended (a timeout still fails it).
    :param end_from_trigger: With ``deferrable``, let the trigger end the task (Airflow >= 2.10): the wait
        costs no second worker run. Airflow then skips ``on_success_callback``, refuses the DAG while a
        listener such as OpenLineage is registered, and (before 3.3) does not retry a task the trigger failed.
    :param resume: On Airflow 3.3, let a retry resume this task instance's earlier prediction (same model
        and input) instead of creating a new one.
    """

    template_fields: Sequence[str] = ("model", "input")
    _returns = "id"  # the trigger's return value when it ends the task (end_from_trigger)
    template_fields_renderers: ClassVar[dict[str, str]] = {"input": "json"}
    ui_color = "#e8e4fb"
    operator_extra_links = (PredictionLink(),)
    poll_interval: float  # a plain attribute here; the mixin only reads it

    def __init__(
        self,
        *,
        model: str,
        input: Mapping[str, Any] | str,
        cometapi_conn_id: str = CometAPIHook.default_conn_name,
        wait_for_completion: bool = False,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 20.0,
        timeout: float | None = 3600.0,
        prefer_wait: int | None = None,
        cancel_on_kill: bool = True,
        fail_on_error: bool = True,
        end_from_trigger: bool = False,
        resume: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Static values are checked now, so a typo fails at DAG parse time rather than at 2 a.m.
        if not is_templated(model):
            validate_model(model)
        if not is_templated(input):
            # File inputs (a Path or ObjectStoragePath in input_image) are read at run time, not here.
            validate_input(
                {k: v for k, v in input.items() if k not in FILE_INPUT_KEYS} if isinstance(input, Mapping) else input,
                allow_templates=True,
            )
        if prefer_wait is not None:
            validate_prefer_wait(prefer_wait)
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, got {timeout!r}")
        self.model = model
        self.input = input
        self.cometapi_conn_id = cometapi_conn_id
        self.wait_for_completion = wait_for_completion
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.prefer_wait = prefer_wait
        self.cancel_on_kill = cancel_on_kill
        self.fail_on_error = fail_on_error
        self.end_from_trigger = end_from_trigger
        self.resume = resume
        self.prediction_id: str | None = None

    @cached_property
    def hook(self) -> CometAPIHook:
        return CometAPIHook(cometapi_conn_id=self.cometapi_conn_id)

    def execute(self, context: Context) -> str:
        return self._execute(context, create_waits=0)

    def create_after_wait(self, context: Context, event: Any = None, create_waits: int = 0) -> str:
        """Resume after waiting out CometAPI's ``Retry-After`` in the triggerer: create (or resume) now."""
        return self._execute(context, create_waits=create_waits)

    def _execute(self, context: Context, *, create_waits: int) -> str:
        model = validate_model(self.model)
        # Local or object-storage images become data: URIs first: they are not JSON, and the resume
        # fingerprint should cover the file's content, not its name.
        raw = self.input
        payload = validate_input(resolve_file_inputs(raw) if isinstance(raw, Mapping) else raw)
        try:
            prediction = self._resume_or_create(context, model, payload)
        except CometAPIRetryLaterError as error:
            if create_waits >= MAX_CREATE_WAITS:
                raise
            self._wait_in_triggerer(error, create_waits)
        self.prediction_id = prediction["id"]
        self._push_link(context, prediction)
        if not self.wait_for_completion:
            return prediction["id"]

        end_time, is_task_timeout = self._deadline(context, self.timeout)
        if not is_terminal(prediction) and self.deferrable:
            # Read back in pre_execute when Airflow resumes the task without the trigger's event.
            context["ti"].xcom_push(key=XCOM_DEFERRED_PREDICTION_ID, value=prediction["id"])
            self.defer(
                trigger=self._trigger(prediction, end_time),
                method_name="execute_complete",
                kwargs={"deadline_is_task_timeout": is_task_timeout},
                # The deadline lives in the trigger (a ``timeout`` event), so that execute_complete can cancel
                # the prediction: a framework timeout would fail the task without calling us.
                timeout=None,
            )
        event = self._wait_in_worker(prediction, end_time)
        return self._complete(context, event, is_task_timeout)

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None, deadline_is_task_timeout: bool = False
    ) -> str:
        """Resume after the trigger fired: fail unless the prediction succeeded."""
        return self._complete(context, event, deadline_is_task_timeout)

    def _complete(self, context: Context, event: Any, deadline_is_task_timeout: bool) -> str:
        self.prediction_id = (event or {}).get("prediction_id") if isinstance(event, dict) else None
        prediction = self._finish(event, deadline_is_task_timeout=deadline_is_task_timeout)
        context["ti"].xcom_push(key=XCOM_PREDICTION, value=prediction)
        self._push_link(context, prediction)
        return prediction["id"]

    def _wait_in_triggerer(self, error: CometAPIRetryLaterError, create_waits: int) -> None:
        from datetime import timedelta

        try:
            from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
        except ImportError:  # Airflow 2 without the standard provider
            from airflow.triggers.temporal import TimeDeltaTrigger  # type: ignore[no-redef,import-not-found]  # Airflow 2 only

        delay = float(error.retry_after or LONGEST_SLEEP_IN_WORKER)
        self.log.info("CometAPI asked to wait %.0f s before creating (%s); waiting in the triggerer", delay, error)
        self.defer(
            trigger=TimeDeltaTrigger(timedelta(seconds=delay)),
            method_name="create_after_wait",
            kwargs={"create_waits": create_waits + 1},
            timeout=None,
        )

    def _resume_or_create(self, context: Context, model: str, payload: dict[str, Any]) -> dict[str, Any]:
        digest = resume.fingerprint(self.cometapi_conn_id, model, payload)
        earlier = resume.recall(context, digest) if self.resume else None
        if earlier:
            try:
                prediction = self.hook.get_prediction(earlier)
            except CometAPINotFoundError:
                prediction = None
            reason = resume.why_not_resumable(prediction, time.time())
            if prediction and reason is None:
                self.log.info(
                    "Resuming prediction %s (%s) started by an earlier try of this task",
                    earlier,
                    prediction.get("status"),
                )
                return prediction
            self.log.info("Not resuming the earlier try's prediction %s (%s); creating a new one", earlier, reason)

        self.log.info("Creating a prediction of %s", model)
        started = time.monotonic()
        prediction = self.hook.create_prediction(
            model,
            payload,
            prefer_wait=self.prefer_wait,
            longest_sleep=LONGEST_SLEEP_IN_WORKER if self.deferrable else None,
        )
        self.log.info(
            "Created prediction %s (status %s) in %.2f s",
            prediction.get("id"),
            prediction.get("status"),
            time.monotonic() - started,
        )
        if not isinstance(prediction.get("id"), str):
            raise CometAPIResponseError(f"CometAPI's create answer has no prediction id (keys: {sorted(prediction)})")
        # Saved before any waiting, so that a worker lost from here on does not cost a second prediction.
        if resume.remember(context, prediction["id"], digest):
            self.log.info("Saved prediction id %s in the task state store for retries", prediction["id"])
        return prediction

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: the files read as inputs (``input_image`` paths) and the model and prediction made."""
        from airflow_comet.lineage import prediction_lineage

        return prediction_lineage(
            model=self.model,
            prediction_ids=[self.prediction_id] if self.prediction_id else [],
            # From the rendered input, without reading the files (this may run after a resume, in a new process).
            inputs=file_input_paths(self.input) if isinstance(self.input, Mapping) else [],
        )

    def on_kill(self) -> None:
        """Cancel the running prediction (best effort) when the task is stopped in the worker."""
        self._cancel_on_kill(self.prediction_id)
