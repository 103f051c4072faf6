"""The I/O of a prediction batch in the worker: creating items, persisting their outputs, cancelling.

Creates go through the hook's async transport, so they are sent concurrently yet paced by the connection's
``max_requests_per_second`` (its :class:`~airflow_comet.hooks._ratelimit.RequestBudget`, as in the
triggerer) and pause together on a ``429``'s ``Retry-After``. Each id is written to the task state store as
soon as its create answers, before anything else happens to it. Downloads run in a few threads at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from airflow_comet import resume
from airflow_comet.exceptions import (
    CometAPIAuthError,
    CometAPIConfigError,
    CometAPIError,
    CometAPINotFoundError,
    CometAPINotJSONError,
    CometAPIRetryLaterError,
)
from airflow_comet.file_inputs import resolve_file_inputs
from airflow_comet.hooks._retry import RetryPolicy
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.operators._waiting import created_epoch
from airflow_comet.operators.persist import output_urls, persist_outputs
from airflow_comet.outputs import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT, accepted_content_types
from airflow_comet.validation import validate_input

if TYPE_CHECKING:
    from airflow_comet._address_guard import AddressPolicy
    from airflow_comet.batch_state import BatchState

__all__ = ["Created", "cancel_all", "create_items", "persist_items", "settle"]

#: Output files downloaded at once (each item's files one after the other).
DOWNLOADS_AT_ONCE = 8
#: Retries of one output file (connection errors, truncation, 408/429/5xx), as PersistPredictionOutputOperator.
DOWNLOAD_POLICY = RetryPolicy(max_retries=4, backoff_base=1.0)
#: Fingerprint characters kept per item in the task state store (collisions need a changed input anyway).
FINGERPRINT_CHARS = 16
#: The statuses after which an item is created again while it has ``item_retries`` left.
_RETRIED = frozenset({"failed", "error"})
#: Create errors that no other item can escape either: the batch stops creating.
_FATAL = (CometAPIAuthError, CometAPIConfigError, CometAPINotJSONError, CometAPINotFoundError)


@dataclass
class Created:
    """What became of one item's create: a prediction (new or an earlier try's), or an error."""

    index: int
    attempts: int
    prediction: dict[str, Any] | None = None
    error: str | None = None
    #: The error stops the whole batch (the key, the host or the model is wrong).
    fatal: bool = False
    #: Creating the item again may help (the service was busy or unreachable).
    retryable: bool = False
    #: CometAPI asked to wait this many seconds before creating (a ``429``): nothing was created, try later.
    later: float | None = None


async def create_items(
    hook: CometAPIHook,
    model: str,
    items: Sequence[tuple[int, int, Mapping[str, Any]]],
    *,
    ledger: resume.BatchLedger,
    earlier: dict[int, tuple[str, str, int]],
    log: Any,
    longest_sleep: float | None = None,
) -> list[Created]:
    """Create ``(index, attempts so far, input)`` items concurrently; an item an earlier try of the task
    started (``earlier``: id, fingerprint, attempts; same fingerprint) is resumed when it is still running,
    recently succeeded or failed, and its attempts count on from the earlier try's. With ``longest_sleep``, an
    item CometAPI asks to wait longer than that for comes back with ``later`` set instead of sleeping here."""

    async def one(index: int, attempts: int, model_input: Mapping[str, Any]) -> Created:
        try:
            # Image files named in the input are read here, not in the event loop's thread.
            payload = validate_input(await asyncio.to_thread(resolve_file_inputs, model_input))
        except ValueError as error:
            return Created(index, attempts + 1, error=f"its input cannot be sent: {error}")
        digest = resume.fingerprint(hook.cometapi_conn_id, model, payload)[:FINGERPRINT_CHARS]
        known = earlier.pop(index, None)
        if known is not None and known[1] == digest and attempts == 0:
            resumed = await _resume(hook, index, known[0], log, longest_sleep)
            if resumed is not None:
                return Created(index, known[2], resumed)
            # Created anew (cancelled by the batch's kill or deadline, or a success whose outputs expired): that
            # counts as one more attempt, as a lost prediction does within a try.
            attempts = known[2]
        try:
            prediction = await hook.acreate_prediction(model, payload, longest_sleep=longest_sleep)
        except CometAPIRetryLaterError as error:
            return Created(index, attempts, later=float(error.retry_after or longest_sleep or 0.0))
        except _FATAL as error:
            return Created(index, attempts + 1, error=f"creating its prediction failed: {error}", fatal=True)
        except CometAPIError as error:
            return Created(
                index, attempts + 1, error=f"creating its prediction failed: {error}", retryable=error.retryable
            )
        prediction_id = prediction.get("id")
        if not isinstance(prediction_id, str):
            return Created(index, attempts + 1, error="CometAPI's create answer has no prediction id", retryable=True)
        # Before anything else: a worker lost from here on must not cost this item a second prediction. In a
        # thread: on Airflow 3 the store talks to the supervisor with a blocking call, which must not run on
        # the event loop's thread while another request of the loop (a connection lookup) is in flight.
        recorded = await asyncio.to_thread(ledger.record, index, prediction_id, digest, attempts + 1)
        if not recorded and ledger.supported:
            # No retry could ever find it, and this try stops creating: nobody would follow it but the bill.
            try:
                await hook.acancel_prediction(prediction_id)
            except CometAPIError as error:
                log.warning("Could not cancel prediction %s: %s", prediction_id, error)
            return Created(
                index,
                attempts + 1,
                fatal=True,
                error=f"the id of its prediction {prediction_id} could not be saved in the task state store, so "
                "that prediction was cancelled (a retry of the task could not have found it)",
            )
        log.debug("Item #%d: created prediction %s (attempt %d)", index, prediction_id, attempts + 1)
        return Created(index, attempts + 1, prediction)

    return list(await asyncio.gather(*(one(index, attempts, item) for index, attempts, item in items)))


async def _resume(
    hook: CometAPIHook, index: int, prediction_id: str, log: Any, longest_sleep: float | None
) -> dict[str, Any] | None:
    """The earlier try's prediction of item ``index`` if it can be used, else ``None`` (create anew)."""
    try:
        prediction: dict[str, Any] | None = await hook.aget_prediction(prediction_id, longest_sleep=longest_sleep)
    except CometAPINotFoundError:
        prediction = None
    except CometAPIError as error:
        # Unknown now, maybe running: following it costs a few status checks, creating anew a prediction.
        log.warning("Item #%d: could not read earlier prediction %s (%s); following it", index, prediction_id, error)
        return {"id": prediction_id, "status": "starting", "created_at": None}
    reason = resume.why_not_resumable(prediction, time.time())
    # A prediction CometAPI failed (a refused prompt, a model error) is that item's outcome, as it would have
    # been in the earlier try: a task retry must not pay for it again; ``item_retries`` decides that. Only
    # canceled/aborted ones (the batch's own deadline or on_kill) and stale successes are created anew.
    if reason is None or (prediction is not None and prediction.get("status") == "failed"):
        assert prediction is not None
        log.info("Item #%d: resuming prediction %s (%s) of an earlier try", index, prediction_id, prediction["status"])
        return prediction
    log.info("Item #%d: not resuming earlier prediction %s (%s); creating a new one", index, prediction_id, reason)
    return None


def persist_items(
    jobs: Sequence[tuple[int, Mapping[str, Any], Mapping[str, Any]]], folder: Any, *, log: Any, addresses: AddressPolicy
) -> dict[int, list[dict[str, Any]] | Exception]:
    """Download the outputs of ``(index, prediction, input)`` jobs into ``folder``, a few items at once;
    ``index -> file records``, or the error that stopped that item's files."""

    def one(prediction: Mapping[str, Any], model_input: Mapping[str, Any]) -> list[dict[str, Any]]:
        return persist_outputs(
            prediction["id"],
            output_urls(prediction),
            folder,
            accepted=accepted_content_types(model_input),
            max_bytes=DEFAULT_MAX_BYTES,
            timeout=DEFAULT_TIMEOUT,
            policy=DOWNLOAD_POLICY,
            logger=log,
            addresses=addresses,
        )

    results: dict[int, list[dict[str, Any]] | Exception] = {}
    if not jobs:
        return results
    with ThreadPoolExecutor(max_workers=min(DOWNLOADS_AT_ONCE, len(jobs)), thread_name_prefix="comet-persist") as pool:
        futures = {index: pool.submit(one, prediction, model_input) for index, prediction, model_input in jobs}
        for index, future in futures.items():
            try:
                results[index] = future.result()
            except Exception as error:  # noqa: BLE001 - one item's files failing must not lose the others'
                results[index] = error
    return results


def cancel_all(hook: CometAPIHook, prediction_ids: Sequence[str], *, log: Any) -> dict[str, bool | None]:
    """Cancel predictions (best effort, a few at once): ``id -> True`` cancelled, ``None`` no cancel endpoint,
    ``False`` the request failed."""

    def one(prediction_id: str) -> bool | None:
        try:
            answer = hook.cancel_prediction(prediction_id)
        except Exception as error:  # noqa: BLE001 - best effort
            log.warning("Could not cancel prediction %s: %s", prediction_id, error)
            return False
        if answer is not None:
            log.info("Cancelled prediction %s", prediction_id)
            return True
        return None

    if not prediction_ids:
        return {}
    try:
        hook.session  # noqa: B018 - built once here, not by several threads at once
    except Exception as error:  # noqa: BLE001 - e.g. the connection is gone: each cancel says so below
        log.warning("Cancelling may fail: %s", error)
    with ThreadPoolExecutor(max_workers=min(8, len(prediction_ids)), thread_name_prefix="comet-cancel") as pool:
        return dict(zip(prediction_ids, pool.map(one, prediction_ids), strict=True))


def created_at(prediction: Mapping[str, Any]) -> float:
    """When a prediction was created, as epoch seconds (drives its poll schedule)."""
    return created_epoch(dict(prediction))


def settle(
    state: BatchState,
    outcomes: Sequence[tuple[int, int, Mapping[str, Any]]],
    inputs: Sequence[Mapping[str, Any]],
    folder: Any,
    *,
    item_retries: int,
    cancel: Callable[[list[str]], dict[str, bool | None]] | None,
    log: Any,
    addresses: AddressPolicy,
) -> None:
    """Record how items ended (``(index, attempts, event)``): persist the succeeded into ``folder`` (if any),
    queue failed or lost ones again while ``item_retries`` last, ``cancel`` those that ran past the deadline
    (``None``: leave them running)."""
    to_persist: list[tuple[int, int, Mapping[str, Any]]] = []
    to_cancel: list[tuple[int, int, Mapping[str, Any], Any]] = []
    for index, attempts, event in outcomes:
        status = event.get("status")
        prediction: Mapping[str, Any] | None = event.get("prediction") or (
            {"id": event["prediction_id"]} if event.get("prediction_id") else None
        )
        if status == "succeeded":
            if folder is None:
                state.finish(index, "succeeded", prediction, attempts)
            else:
                # Only a failed create has no prediction; succeeded and timeout events name theirs.
                to_persist.append((index, attempts, cast(Mapping[str, Any], prediction)))
        elif status == "timeout":
            to_cancel.append((index, attempts, cast(Mapping[str, Any], prediction), event.get("message")))
        elif status in _RETRIED and event.get("retry", True) and attempts <= item_retries and not state.halted:
            log.warning(
                "Item #%d: %s; creating it again (attempt %d of %d)",
                index,
                event.get("message"),
                attempts + 1,
                item_retries + 1,
            )
            state.queue.append([index, attempts])
        else:
            # The prediction's own status when it ended (aborted stays aborted), else how the wait ended.
            own = (prediction or {}).get("status")
            row_status = (
                own if status in ("failed", "canceled") and own in ("failed", "canceled", "aborted") else status
            )
            error = (prediction or {}).get("error") or event.get("message")
            log.warning("Item #%d ended %s: %s", index, row_status, error)
            state.finish(index, str(row_status or "error"), prediction, attempts, error=str(error) if error else None)

    results = persist_items([(i, p, inputs[i]) for i, _, p in to_persist], folder, log=log, addresses=addresses)
    for index, attempts, prediction in to_persist:
        files = results[index]
        if isinstance(files, Exception):
            log.warning("Item #%d: saving the outputs of prediction %s failed: %s", index, prediction["id"], files)
            state.finish(
                index,
                "error",
                prediction,
                attempts,
                error=f"the prediction succeeded but saving its outputs failed: {files}",
            )
        else:
            state.finish(index, "succeeded", prediction, attempts, files=files)

    if to_cancel:
        state.timed_out = True
        state.halt("the batch's deadline passed before it was created")
        cancelled = cancel([p["id"] for _, _, p, _ in to_cancel]) if cancel is not None else {}
        for index, attempts, prediction, message in to_cancel:
            if cancel is None:
                what = "It was left running (cancel_on_kill=False)."
            elif cancelled.get(prediction["id"]):
                what = "It was cancelled."
            else:
                what = "It could not be cancelled and may still be running."
            state.finish(index, "timeout", prediction, attempts, error=f"{message} {what}")
