"""Run-stable memory of the prediction a task started, so that a retry resumes it instead of paying again.

Airflow 3.3 gives each task instance a ``task_state_store`` that outlives a try (XCom is cleared before
every retry, so it cannot serve here). The record is keyed by the task instance itself (dag, run, task,
map index; never the try number) and carries a fingerprint of what was asked, so a changed prompt or model
is never answered with an old prediction. On older Airflow there is no store and every try creates anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any

from airflow_comet.hooks._protocol import iso_epoch

log = logging.getLogger(__name__)

STATE_KEY = "cometapi_prediction"
#: A succeeded prediction is resumed only this soon after it completed: its output URLs expire (an hour after
#: the prediction on Replicate), and a task run again later (cleared by a person to regenerate, retried after
#: a failed persist) needs outputs that can still be downloaded.
SUCCEEDED_RESUMABLE_FOR = 30 * 60.0


def fingerprint(conn_id: str, model: str, input: dict[str, Any]) -> str:
    """A digest of everything that decides what a prediction makes and which account pays for it."""
    material = json.dumps(
        {"conn_id": conn_id, "model": model, "input": input}, sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(material.encode()).hexdigest()


def _store(context: Any) -> Any:
    try:
        return context.get("task_state_store")
    except Exception:  # noqa: BLE001 - a context without the key on older Airflow
        return None


def recall(context: Any, digest: str) -> str | None:
    """The prediction id an earlier try of this task started for the same request, if any."""
    store = _store(context)
    if store is None:
        return None
    try:
        record = store.get(STATE_KEY)
    except Exception:
        log.warning("Could not read the task state store; a new prediction will be created", exc_info=True)
        return None
    if isinstance(record, dict) and record.get("fingerprint") == digest and isinstance(record.get("id"), str):
        return record["id"]
    return None


def remember(context: Any, prediction_id: str, digest: str) -> bool:
    """Save the prediction id before waiting on it; ``True`` when it was saved."""
    store = _store(context)
    if store is None:
        return False
    try:
        store.set(STATE_KEY, {"id": prediction_id, "fingerprint": digest})
    except Exception:
        log.warning("Could not save prediction %s in the task state store", prediction_id, exc_info=True)
        return False
    return True


def supported(context: Any) -> bool:
    return _store(context) is not None


def why_not_resumable(prediction: dict[str, Any] | None, now: float) -> str | None:
    """Why an earlier try's prediction must not be resumed (``None``: resume it)."""
    if not prediction:
        return "it is gone"
    status = prediction.get("status")
    if status in ("starting", "processing"):
        return None
    if status != "succeeded":
        return f"it ended {status}"
    if prediction.get("data_removed"):
        return "its outputs were removed"
    completed = iso_epoch(prediction.get("completed_at")) or iso_epoch(prediction.get("created_at"))
    if completed is None or now - completed > SUCCEEDED_RESUMABLE_FOR:
        return f"it succeeded over {SUCCEEDED_RESUMABLE_FOR / 60:.0f} minutes ago and its output URLs may have expired"
    return None


#: A batch's ids are kept in chunks of this many items, one state-store key each (``cometapi_batch.<n>``): a
#: write stays a few kilobytes whatever the batch's size, and a retry reads the whole batch in a few gets.
BATCH_KEY = "cometapi_batch"
BATCH_CHUNK = 64
#: Written before each round of creates, to learn whether this try can still record anything.
BATCH_PROBE_KEY = f"{BATCH_KEY}.writable"


class BatchLedger:
    """The prediction each item of a batch started, kept in the task state store as soon as it exists.

    A chunk is read before its first write in a process, so a write never drops what an earlier run of the
    task (before a deferral, or an earlier try) recorded. Thread-safe: creates finish concurrently.
    """

    def __init__(self, context: Any) -> None:
        self._store = _store(context)
        self._chunks: dict[int, dict[str, list[Any]]] = {}
        self._lock = threading.Lock()

    @property
    def supported(self) -> bool:
        return self._store is not None

    def recall(self, total: int) -> dict[int, tuple[str, str, int]]:
        """``index -> (prediction id, fingerprint, attempts)`` of every item an earlier try recorded (the
        attempts counting that prediction's create, so ``item_retries`` holds per item, not per try)."""
        found: dict[int, tuple[str, str, int]] = {}
        if self._store is None:
            return found
        with self._lock:
            for chunk in range(-(-total // BATCH_CHUNK)):
                for key, value in self._load(chunk).items():
                    if key.isdigit() and isinstance(value, list) and len(value) in (2, 3) and int(key) < total:
                        # Two fields: recorded before attempts were kept (one attempt known).
                        attempts = value[2] if len(value) == 3 and isinstance(value[2], int) else 1
                        found[int(key)] = (str(value[0]), str(value[1]), attempts)
        return found

    def writable(self) -> bool:
        """Whether this try can record ids now (``True`` without a store: there is nothing to keep).

        Airflow 3.3.2 sometimes fails a task that has just resumed and starts its next try while the resumed
        process still runs (apache/airflow#72716); from then on every write of the old try fails (its task
        instance id is gone), and nothing it creates could be found again. Reading cannot tell: a read of a
        gone task instance answers "no such key"."""
        if self._store is None:
            return True
        try:
            self._store.set(BATCH_PROBE_KEY, 1)
        except Exception as error:  # noqa: BLE001 - any failure means the same: do not create now
            log.warning("The task state store cannot be written (%s)", error)
            return False
        return True

    def record(self, index: int, prediction_id: str, digest: str, attempts: int = 1) -> bool:
        """Save item ``index``'s prediction id with its fingerprint and the item's creates so far (this one
        included); ``True`` when it was saved."""
        if self._store is None:
            return False
        chunk = index // BATCH_CHUNK
        with self._lock:
            try:
                entries = self._load(chunk)
                entries[str(index)] = [prediction_id, digest, attempts]
                self._store.set(f"{BATCH_KEY}.{chunk}", entries)
            except Exception:
                log.warning(
                    "Could not save prediction %s of item %d in the task state store",
                    prediction_id,
                    index,
                    exc_info=True,
                )
                return False
        return True

    def _load(self, chunk: int) -> dict[str, list[Any]]:
        entries = self._chunks.get(chunk)
        if entries is None:
            try:
                stored = self._store.get(f"{BATCH_KEY}.{chunk}")
            except Exception:
                log.warning(
                    "Could not read the task state store; earlier ids of this batch are not reused", exc_info=True
                )
                stored = None
            entries = dict(stored) if isinstance(stored, dict) else {}
            self._chunks[chunk] = entries
        return entries
