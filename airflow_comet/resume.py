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
    except Exception:  # noqa: BLE001 - resuming is an optimisation; never fail the task over it
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
    except Exception:  # noqa: BLE001
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
