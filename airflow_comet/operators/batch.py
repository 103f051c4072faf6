"""PredictionBatchOperator: one task instance that runs a whole batch of predictions."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import AirflowException, AirflowTaskTimeout, BaseOperator, conf

from airflow_comet.batch_inputs import check_static_inputs, inputs_digest, load_inputs
from airflow_comet.batch_state import BatchState, slim_prediction
from airflow_comet.batch_work import cancel_all, create_items, created_at, settle
from airflow_comet.exceptions import PredictionFailedError
from airflow_comet.hooks._per_loop import new_worker_loop
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.manifest import raise_for_failures, summary, write_manifest
from airflow_comet.operators._waiting import PredictionWaitMixin
from airflow_comet.operators.prediction import LONGEST_SLEEP_IN_WORKER, MAX_CREATE_WAITS
from airflow_comet.output_files import destination_folder
from airflow_comet.outputs import address_policy_for
from airflow_comet.polling import is_terminal, terminal_event
from airflow_comet.resume import BatchLedger
from airflow_comet.triggers.batch import EndCollector, PredictionBatchTrigger
from airflow_comet.validation import is_templated, validate_model

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

#: The deferred task is resumed to refill once this share of ``max_in_flight`` ended (or all did): each
#: resume costs a worker start, so not for every single prediction.
REFILL_SHARE = 0.25
#: ... or at the latest this many seconds after the first of them ended, so long predictions do not leave
#: free places unused for minutes.
REFILL_HOLD = 30.0
#: With nothing left to create, outputs are still persisted within this long of their prediction's end
#: (output URLs expire about an hour after the prediction).
OUTPUTS_HOLD = 15 * 60.0
#: A batch's trigger fires no sooner than this many seconds after the task deferred. Airflow 3.2 to 3.3.2 fail
#: a task that resumes before the scheduler has processed its worker's exit on deferring ("finished with
#: state success, but the task instance's state attribute is queued/running": apache/airflow#67287, #72716),
#: which took up to ~6 s on a busy 2-core deployment; a batch, which defers again at every refill while its
#: predictions keep ending, hit it twice a minute with an immediate trigger, losing a try each time.
MIN_DEFERRAL = 10.0
#: XCom key of the running predictions' ``[index, id]``, pushed before deferring (see ``pre_execute``).
XCOM_RUNNING = "batch_running"


class PredictionBatchOperator(BaseOperator):
    """
    Run a whole batch of predictions of one model in one task: at most ``max_in_flight`` at once, each
    created once, each output persisted as it finishes, one row per input as the result.

    Creates leave the worker paced by the connection's ``max_requests_per_second``; as predictions end the
    next items are created. The waiting happens in the triggerer when ``deferrable`` (the worker is resumed
    to persist and refill once a quarter of ``max_in_flight`` ended), else in the worker. Both follow the
    predictions with the same poller as ``PredictionTrigger``.

    The XCom ``return_value`` is one row per input, in input order (see :mod:`airflow_comet.manifest`):
    ``index``, ``input``, ``prediction_id``, ``model``, ``status``, ``error``, ``predict_time``, ``files``
    (``path``, ``size``, ``sha256``, ``content_type``) and ``attempts``. With a ``destination`` the same rows
    are written to ``manifest.jsonl`` beside the files before the task decides whether it failed. It fails
    when more than ``max_failures`` items did not succeed, at the deadline (cancelling what still runs), or
    when creating is impossible (wrong key, host or model).

    Exactly once: on Airflow 3.3 each item's prediction id is saved in the task state store as soon as it
    is created, so a retry after a lost worker follows (or persists) the earlier try's predictions instead of
    paying again (same model and input; a succeeded one only while its output URLs last, 30 minutes; a
    failed one keeps its outcome, ``item_retries`` decides whether it is created again). On older Airflow
    there is no such store: a retry creates every item again.

    :param model: ``owner/name`` (templated).
    :param inputs: The model inputs: a list of dicts (templated; an upstream task's output works), or a
        ``.jsonl`` / ``.csv`` file on object storage (a path, URL or ``ObjectStoragePath``), one input per
        line or row (CSV values are text; empty cells are left out).
    :param max_in_flight: Predictions running at CometAPI at once.
    :param destination: Folder for the output files and ``manifest.jsonl`` (``file:///...``,
        ``s3://bucket/prefix/``; templated). ``None``: nothing is downloaded.
    :param destination_conn_id: The connection for ``destination`` (templated).
    :param max_failures: Items allowed to end without success before the task fails.
    :param item_retries: Times an item whose prediction failed or was lost is created again.
    :param cometapi_conn_id: The CometAPI connection.
    :param deferrable: Wait in the triggerer (default ``[operators] default_deferrable``).
    :param poll_interval: Longest gap between two status checks of a prediction, in seconds.
    :param timeout: Seconds for the whole batch; at the deadline running predictions are cancelled, items
        not started are reported ``missing`` and the task fails (``None``: only ``execution_timeout``).
    :param cancel_on_kill: Cancel the running predictions when the task is stopped or times out.
    """

    template_fields: Sequence[str] = ("model", "inputs", "destination", "destination_conn_id")
    template_fields_renderers: ClassVar[dict[str, str]] = {"inputs": "json"}
    ui_color = "#e8e4fb"

    def __init__(
        self,
        *,
        model: str,
        inputs: Any,
        max_in_flight: int = 16,
        destination: Any = None,
        destination_conn_id: str | None = None,
        max_failures: int = 0,
        item_retries: int = 0,
        cometapi_conn_id: str = CometAPIHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 20.0,
        timeout: float | None = 3 * 3600.0,
        cancel_on_kill: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Static values are checked now, so a typo fails at DAG parse time rather than at 2 a.m.
        if not is_templated(model):
            validate_model(model)
        check_static_inputs(inputs)
        _check_whole("max_in_flight", max_in_flight, 1)
        _check_whole("max_failures", max_failures, 0)
        _check_whole("item_retries", item_retries, 0)
        if isinstance(poll_interval, bool) or not isinstance(poll_interval, (int, float)) or poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive seconds, got {poll_interval!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"timeout must be positive seconds or None, got {timeout!r}")
        if isinstance(destination, str) and not is_templated(destination) and "://" not in destination:
            destination_folder(destination)  # a relative path fails now, with the same message as at run time
        self.model = model
        self.inputs = inputs
        self.max_in_flight = max_in_flight
        self.destination = destination
        self.destination_conn_id = destination_conn_id
        self.max_failures = max_failures
        self.item_retries = item_retries
        self.cometapi_conn_id = cometapi_conn_id
        self.deferrable = deferrable
        self.poll_interval = float(poll_interval)
        self.timeout = timeout
        self.cancel_on_kill = cancel_on_kill
        self._state: BatchState | None = None
        #: Epoch before which no create is sent: CometAPI asked to wait (a 429's Retry-After).
        self._create_after = 0.0

    @cached_property
    def hook(self) -> CometAPIHook:
        return CometAPIHook(cometapi_conn_id=self.cometapi_conn_id)

    # -- entry points ---------------------------------------------------------------------------------------

    def execute(self, context: Context) -> list[dict[str, Any]]:
        model = validate_model(self.model)
        inputs = load_inputs(self.inputs)
        end_time, task_timeout = PredictionWaitMixin._deadline(self, context, self.timeout)  # type: ignore[arg-type]
        state = BatchState(
            total=len(inputs),
            digest=inputs_digest(inputs),
            started_at=time.time(),
            end_time=end_time,
            task_timeout=task_timeout,
        )
        ledger = BatchLedger(context)
        earlier = ledger.recall(state.total)
        self.log.info(
            "Batch of %d predictions of %s, at most %d at once%s",
            state.total,
            model,
            self.max_in_flight,
            f"; {len(earlier)} started by an earlier try" if earlier else "",
        )
        if not ledger.supported:
            self.log.info("No task state store (Airflow < 3.3): a retry of this task creates every item again")
        return self._run(context, state, model, inputs, ledger, earlier, [])

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Resume after the trigger fired: persist what ended, create the next items, wait again."""
        if not isinstance(event, Mapping) or event.get("status") not in ("ended", "error"):
            self.on_kill()
            raise AirflowException(f"Unexpected event from the batch trigger: {event!r:.300}")
        batch = self._state = BatchState.from_json(event.get("state"))
        model = validate_model(self.model)
        inputs = load_inputs(self.inputs)
        if len(inputs) != batch.total or inputs_digest(inputs) != batch.digest:
            self.on_kill()
            raise AirflowException(
                f"The batch's inputs changed while it ran ({batch.total} inputs before, {len(inputs)} now): "
                "its running predictions were cancelled; clear the task to start the batch again"
            )
        ledger = BatchLedger(context)
        # An earlier try's items this try has not taken yet (a fill cut short by a 429): resumed, not paid twice.
        # Items this try created are never taken again as new, so recalling them too is harmless; a first try
        # has no earlier one, and skips reading the whole ledger at every refill.
        retried = (getattr(context.get("ti"), "try_number", None) or 1) > 1
        earlier = ledger.recall(batch.total) if batch.waiting and retried else {}
        return self._run(context, batch, model, inputs, ledger, earlier, self._ended_from(event, batch))

    def pre_execute(self, context: Context) -> None:
        super().pre_execute(context)
        # Airflow 2 may call on_kill on resume, before execute_complete, or fail a deferred task without its
        # trigger's event (execution_timeout passed while deferred): on_kill must know what runs.
        ti = context.get("ti")
        kwargs = getattr(ti, "next_kwargs", None)
        event = kwargs.get("event") if isinstance(kwargs, Mapping) else None
        if isinstance(event, Mapping) and isinstance(event.get("state"), Mapping):
            with contextlib.suppress(TypeError, ValueError):
                self._state = BatchState.from_json(event["state"])
        elif ti is not None and getattr(ti, "next_method", None):
            with contextlib.suppress(Exception):
                running = ti.xcom_pull(task_ids=ti.task_id, key=XCOM_RUNNING, map_indexes=ti.map_index)
                if isinstance(running, list) and running:
                    self._state = BatchState(total=0, digest="", started_at=0.0, running=[list(r) for r in running])

    def on_kill(self) -> None:
        """Cancel every prediction of the batch that still runs (best effort)."""
        state = self._state
        if self.cancel_on_kill and state is not None and state.running:
            cancel_all(self.hook, [row[1] for row in state.running], log=self.log)

    # -- the batch ----------------------------------------------------------------------------------------

    def _run(
        self,
        context: Context,
        state: BatchState,
        model: str,
        inputs: list[dict[str, Any]],
        ledger: BatchLedger,
        earlier: dict[int, tuple[str, str, int]],
        outcomes: list[tuple[int, int, dict[str, Any]]],
    ) -> list[dict[str, Any]]:
        self._state = state
        self._create_after = 0.0
        folder = destination_folder(self.destination, self.destination_conn_id) if self.destination else None
        # Looked up once per run of the worker, with the blocking call, before the loop exists.
        addresses = address_policy_for(self.cometapi_conn_id, self.log)
        # One event loop for this run of the worker: the creates' pool, budget and (when waiting here) the
        # shared poller live in it across rounds. A worker loop: connection lookups in it stay blocking calls
        # (in a thread), never mixed with the task SDK's async ones (see new_worker_loop).
        loop = new_worker_loop()
        self._collector: EndCollector | None = None
        self._async_hook = CometAPIHook(cometapi_conn_id=self.cometapi_conn_id)
        try:
            while True:
                settle(
                    state,
                    outcomes,
                    inputs,
                    folder,
                    item_retries=self.item_retries,
                    log=self.log,
                    addresses=addresses,
                    cancel=(lambda ids: cancel_all(self.hook, ids, log=self.log)) if self.cancel_on_kill else None,
                )
                if state.end_time is not None and time.time() >= state.end_time and state.waiting:
                    state.timed_out = True
                    state.halt("the batch's deadline passed before it was created")
                outcomes = []
                if state.waiting and len(state.running) < self.max_in_flight and time.time() >= self._create_after:
                    outcomes = loop.run_until_complete(self._fill(state, model, inputs, ledger, earlier))
                    if outcomes:
                        continue
                line = state.progress_due(time.time())
                if line:
                    self.log.info(line)
                if state.finished:
                    break
                if self.deferrable:
                    # Read back in pre_execute when Airflow resumes the task without the trigger's event.
                    context["ti"].xcom_push(key=XCOM_RUNNING, value=[row[:2] for row in state.running])
                    self.defer(
                        trigger=self._trigger(state),
                        method_name="execute_complete",
                        # The deadline lives in the trigger (timeout events), so that the task can cancel.
                        timeout=None,
                    )
                ended = loop.run_until_complete(self._wait_here(state))
                outcomes = [(index, state.stop(index)[2], event) for index, event in sorted(ended.items())]
        finally:
            loop.run_until_complete(self._close_loop())
            loop.close()
        return self._finish(context, state, model, inputs, folder)

    async def _fill(
        self,
        state: BatchState,
        model: str,
        inputs: list[dict[str, Any]],
        ledger: BatchLedger,
        earlier: dict[int, tuple[str, str, int]],
    ) -> list[tuple[int, int, dict[str, Any]]]:
        """Create items into the free places; the outcomes of those that ended at once (or failed to start)."""
        if not await asyncio.to_thread(ledger.writable):
            # What this try created now could be found by no retry (see BatchLedger.writable): stop creating.
            state.halt(
                "the task state store cannot be written (Airflow may already run another try of this task), "
                "and a prediction whose id it cannot keep could be paid for twice"
            )
            return []
        items: list[tuple[int, int, dict[str, Any]]] = []
        while len(state.running) + len(items) < self.max_in_flight and (taken := state.take()) is not None:
            items.append((taken[0], taken[1], inputs[taken[0]]))
        outcomes = []
        # Deferrable: a 429 asking for a longer wait defers the batch (no worker held through it) instead.
        longest_sleep = LONGEST_SLEEP_IN_WORKER if self.deferrable else None
        made = await create_items(
            self._async_hook, model, items, ledger=ledger, earlier=earlier, log=self.log, longest_sleep=longest_sleep
        )
        told_to_wait = [created for created in made if created.later is not None]
        # Back to the front of the queue, in the order they were taken, attempts unchanged: nothing was created.
        state.queue[:0] = [[created.index, created.attempts] for created in told_to_wait]
        state.create_waits = state.create_waits + 1 if told_to_wait and len(told_to_wait) == len(made) else 0
        if state.create_waits > MAX_CREATE_WAITS:
            state.halt(f"CometAPI asked to wait (429) {MAX_CREATE_WAITS} times in a row before creating anything")
            return []
        if told_to_wait:
            wait = max(created.later or 0.0 for created in told_to_wait)
            self._create_after = max(self._create_after, time.time() + wait)
            self.log.warning(
                "CometAPI asked to wait %.0f s before creating more (429); %d items wait for it%s",
                wait,
                len(told_to_wait),
                " in the triggerer" if self.deferrable else "",
            )
        for created in made:
            prediction = created.prediction
            if created.later is not None:
                continue
            if prediction is None:
                if created.fatal:
                    state.halt(created.error or "creating predictions failed")
                event: dict[str, Any] = {
                    "status": "error",
                    "prediction_id": None,
                    "prediction": None,
                    "message": created.error,
                    "retry": created.retryable,
                }
                outcomes.append((created.index, created.attempts, event))
            elif is_terminal(prediction):
                event = terminal_event(prediction["id"], prediction)
                outcomes.append((created.index, created.attempts, {**event, "prediction": slim_prediction(prediction)}))
            else:
                state.start(created.index, prediction["id"], created_at(prediction), created.attempts)
        return outcomes

    async def _wait_here(self, state: BatchState) -> dict[int, dict[str, Any]]:
        """Wait in the worker: the trigger's collector, refilled as soon as one prediction ends."""
        if self._collector is None:
            self._collector = EndCollector(
                self.cometapi_conn_id, poll_interval=self.poll_interval, end_time=state.end_time
            )
        for index, prediction_id, created, _ in state.running:
            if index not in self._collector:
                self._collector.follow(index, prediction_id, created)
        return await self._collector.wait(1, log=self.log)

    async def _close_loop(self) -> None:
        if self._collector is not None:
            self._collector.close()
        await self._async_hook.aclose()
        # The shared poller gives its pool back in tasks of its own; a status check still on the wire is not
        # worth waiting for.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        if others:
            _, late = await asyncio.wait(others, timeout=2.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    def _trigger(self, state: BatchState) -> PredictionBatchTrigger:
        hold: float | None
        if state.waiting and not state.halted:
            enough, hold = max(1, math.ceil(self.max_in_flight * REFILL_SHARE)), REFILL_HOLD
        else:
            enough, hold = len(state.running), (OUTPUTS_HOLD if self.destination else None)
        return PredictionBatchTrigger(
            running=[row[:3] for row in state.running],
            cometapi_conn_id=self.cometapi_conn_id,
            poll_interval=self.poll_interval,
            end_time=state.end_time,
            enough=min(enough, len(state.running)),
            hold=hold,
            cancel_on_kill=self.cancel_on_kill,
            progress=state.progress(),
            state=state.to_json(),
            not_before=self._not_before(state),
        )

    def _not_before(self, state: BatchState) -> float:
        """When the trigger may fire at the earliest: after MIN_DEFERRAL, and after the wait CometAPI asked for
        before the next creates (a 429) if anything waits for them; never after the batch's deadline."""
        not_before = max(time.time() + MIN_DEFERRAL, self._create_after if state.waiting and not state.halted else 0.0)
        return min(not_before, state.end_time) if state.end_time is not None else not_before

    def _ended_from(self, event: Any, state: BatchState) -> list[tuple[int, int, dict[str, Any]]]:
        """The trigger's event as ``(index, attempts, event)`` of the predictions that ended."""
        if event["status"] == "error":
            # The wait itself failed (e.g. the connection is gone): stop, and report what ran as lost.
            message = str(event.get("message") or "the batch's trigger failed")
            self.on_kill()
            state.halt(message)
            ended = {
                row[0]: {"status": "error", "prediction_id": row[1], "prediction": None, "message": message}
                for row in state.running
            }
        else:
            ended = {int(index): item for index, item in event.get("ended") or []}
        return [(index, state.stop(index)[2], item) for index, item in sorted(ended.items())]

    def _finish(
        self, context: Context, state: BatchState, model: str, inputs: list[dict[str, Any]], folder: Any
    ) -> list[dict[str, Any]]:
        rows = state.rows(inputs, model, folder)
        self._lineage = {
            "model": model,
            "prediction_ids": [row["prediction_id"] for row in rows if row.get("prediction_id")],
            "outputs": [file["path"] for row in rows for file in row.get("files") or ()],
        }
        where = ""
        if folder is not None:
            where = write_manifest(folder, rows)
            self.log.info("Wrote the manifest of %d items to %s", len(rows), where)
        self.log.info("Batch done in %.0f s: %s", time.time() - state.started_at, summary(rows))
        try:
            if state.timed_out:
                message = f"The batch did not finish by its deadline: {summary(rows)}."
                message += f" Every outcome is in {where}." if where else ""
                raise AirflowTaskTimeout(message) if state.task_timeout else PredictionFailedError(message)
            if state.halted:
                raise PredictionFailedError(f"The batch stopped creating predictions: {state.halted}. {summary(rows)}.")
            raise_for_failures(rows, self.max_failures, where=where)
        except Exception:
            # Still the task's result, for a downstream task that runs whatever happened (trigger_rule all_done).
            context["ti"].xcom_push(key="return_value", value=rows)
            raise
        return rows

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: one output dataset per file written, the model and every prediction as run facets."""
        from airflow_comet.lineage import prediction_lineage

        return prediction_lineage(**getattr(self, "_lineage", {"model": None, "prediction_ids": []}))


def _check_whole(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
