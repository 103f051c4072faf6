"""A run's manifest: one JSON line per prompt with its outcome, written beside the images.

Image models refuse prompts routinely, so a run of hundreds of prompts nearly always has a failure. The
manifest is written whatever the other prompts did, and only then does the run decide whether its failures
fail it (:func:`raise_for_failures`), so that one refused prompt never loses the images that succeeded.

A row: ``index`` (the prompt's position), ``input`` (large values elided), ``prediction_id``, ``model``,
``status`` (``succeeded``, ``failed``, ``canceled``, ``aborted``, or ``missing`` when no prediction
reached the end of the pipeline; ``PredictionBatchOperator`` adds ``error`` when the API refused the create,
the wait lost the prediction or its files could not be saved, and ``timeout`` for one still running at the
batch's deadline), ``error``, ``predict_time`` and ``files`` (``path``, ``size``, ``sha256``,
``content_type`` of each file persisted, in output order).
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from airflow_comet.exceptions import PredictionFailedError
from airflow_comet.output_files import StagedFile, destination_folder
from airflow_comet.polling import compact_prediction

__all__ = ["MANIFEST_NAME", "outcome_row", "pipeline_rows", "raise_for_failures", "write_manifest"]

MANIFEST_NAME = "manifest.jsonl"
#: The status of a prompt for which no finished prediction came back (its create or wait task failed).
MISSING = "missing"
#: Keys of a persisted file's record that go into the manifest (the URL expires, so it is left out).
_FILE_KEYS = ("path", "size", "sha256", "content_type")
#: How many failures a message names before it says "and N more".
_NAMED_FAILURES = 3


def outcome_row(
    index: int,
    model_input: Any,
    prediction: Mapping[str, Any] | None,
    files: Iterable[Mapping[str, Any]] = (),
    *,
    error: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One prompt's line: what was asked, how its prediction ended, and the files kept of it."""
    prediction = prediction or {}
    metrics = prediction.get("metrics")
    if not isinstance(metrics, Mapping):
        metrics = {}
    written = sorted(files, key=lambda record: record.get("index", 0))
    row = {
        "index": index,
        "input": _compact_input(model_input),
        "prediction_id": prediction.get("id"),
        "model": prediction.get("model"),
        "status": prediction.get("status") or MISSING,
        "error": error or _error_text(prediction.get("error")),
        "predict_time": metrics.get("predict_time"),
        "files": [{key: record.get(key) for key in _FILE_KEYS} for record in written],
    }
    row.update(extra)
    return row


def pipeline_rows(
    inputs: Sequence[Any],
    predictions: Iterable[Mapping[str, Any] | None],
    persisted: Iterable[Iterable[Mapping[str, Any]] | None] = (),
) -> list[dict[str, Any]]:
    """Rows for a mapped pipeline (create -> wait -> persist), one per input, in input order.

    ``predictions`` are the waiting tasks' results and ``persisted`` the persist tasks' (lists of file
    records). Files are joined to predictions by prediction id. Predictions line up with ``inputs`` by map
    index when there is one per input; a mapped task whose upstream failed for one prompt has fewer
    results, and then each is matched to its input by the prompt the API echoes back (in order, so
    repeated prompts pair up one to one). An input that no prediction matches gets status ``missing``.
    """
    files_by_id: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for records in persisted:
        for record in records or ():
            files_by_id[str(record.get("prediction_id"))].append(record)

    finished = [p for p in predictions if isinstance(p, Mapping)]
    matched: list[Mapping[str, Any] | None]
    if len(finished) == len(inputs):
        matched = list(finished)  # one result per map index, in map-index order
    else:
        by_input: dict[str, deque[Mapping[str, Any]]] = defaultdict(deque)
        for done in finished:
            by_input[_input_key(done.get("input"))].append(done)
        matched = [
            (queue.popleft() if (queue := by_input.get(_input_key(model_input))) else None) for model_input in inputs
        ]

    rows = []
    for index, (model_input, prediction) in enumerate(zip(inputs, matched, strict=True)):
        files = files_by_id.get(str(prediction.get("id")), []) if prediction else []
        error = None if prediction else "no finished prediction: its create or wait task failed (see that task's log)"
        rows.append(outcome_row(index, model_input, prediction, files, error=error))
    return rows


def write_manifest(folder: Any, rows: Sequence[Mapping[str, Any]], conn_id: str | None = None) -> str:
    """Write ``manifest.jsonl`` into ``folder`` atomically (replacing an earlier one) and return its path."""
    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    with StagedFile(destination_folder(folder, conn_id), MANIFEST_NAME.rsplit(".", 1)[0]) as staged:
        staged.open("jsonl").write(text.encode("utf-8"))
        return str(staged.publish())


def summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """``"18 of 20 succeeded; 2 failed"``: counts by status, for a log line or an error."""
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[str(row.get("status"))] += 1
    others = "; ".join(f"{n} {status}" for status, n in sorted(counts.items()) if status != "succeeded")
    text = f"{counts.get('succeeded', 0)} of {len(rows)} succeeded"
    return f"{text}; {others}" if others else text


def raise_for_failures(rows: Sequence[Mapping[str, Any]], max_failures: int = 0, *, where: str = "") -> None:
    """Fail (``PredictionFailedError``) when more than ``max_failures`` rows did not succeed.

    The message counts them and names the first few with their errors, so the person on call can tell a
    refused prompt from an outage without opening every task's log.
    """
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise ValueError(f"max_failures must be a whole number >= 0, got {max_failures!r}")
    failed = [row for row in rows if row.get("status") != "succeeded"]
    if len(failed) <= max_failures:
        return
    named = "; ".join(
        f"#{row.get('index')} {row.get('prediction_id') or '(no prediction)'} {row.get('status')}: "
        f"{row.get('error') or 'no error given'}"
        for row in failed[:_NAMED_FAILURES]
    )
    more = f"; and {len(failed) - _NAMED_FAILURES} more" if len(failed) > _NAMED_FAILURES else ""
    written = f" Every outcome is in {where}." if where else ""
    raise PredictionFailedError(
        f"{len(failed)} of {len(rows)} predictions did not succeed (max_failures={max_failures}): "
        f"{named}{more}.{written}"
    )


def _compact_input(model_input: Any) -> Any:
    if isinstance(model_input, Mapping):
        return compact_prediction({"input": dict(model_input)})["input"]
    return model_input


def _input_key(model_input: Any) -> str:
    """What pairs a prediction with its input: the prompt (the API may add defaults to the rest of the
    input it echoes), or the whole input for a model without one."""
    if isinstance(model_input, Mapping) and isinstance(model_input.get("prompt"), str):
        return model_input["prompt"]
    return json.dumps(_compact_input(model_input), sort_keys=True, default=str)


def _error_text(error: Any) -> str | None:
    if error is None or error == "":
        return None
    if isinstance(error, Mapping):  # an error envelope rather than the prediction's error string
        return str(error.get("message") or error)
    return str(error)
