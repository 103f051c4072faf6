"""The inputs of a prediction batch: a list of model inputs, or a JSONL or CSV file with one per line or row.

A file is read through Airflow's object storage (``file://``, ``s3://``, a plain absolute path or an
``ObjectStoragePath``), so a nightly job can point the batch at the prompts an upstream system dropped in a
bucket. JSONL lines are JSON objects, taken as they are; CSV rows become dicts of their columns (the header
row names them), every value text, empty cells left out: use JSONL for numbers and booleans.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from airflow.providers.common.compat.sdk import ObjectStoragePath

from airflow_comet.file_inputs import FILE_INPUT_KEYS
from airflow_comet.validation import is_templated, validate_input

__all__ = ["MAX_FILE_BYTES", "check_static_inputs", "inputs_digest", "load_inputs"]

#: The largest inputs file read (every input also goes into the task's return value and the manifest).
MAX_FILE_BYTES = 64 * 1024 * 1024
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_CSV_SUFFIXES = (".csv",)


def check_static_inputs(inputs: Any) -> None:
    """Parse-time checks of ``inputs`` as written in the DAG (templates and XCom references pass)."""
    if is_templated(inputs):
        return
    if isinstance(inputs, (str, os.PathLike)):
        _file_format(inputs)
        return
    if not isinstance(inputs, Sequence) or isinstance(inputs, (bytes, Mapping)):
        raise ValueError(
            "inputs must be a list of model inputs (dicts), a .jsonl or .csv file (path, URL or ObjectStoragePath) "
            f"or an upstream task's output, got {type(inputs).__name__}"
        )
    if not inputs:
        raise ValueError("inputs is an empty list: a batch needs at least one model input")
    for index, item in enumerate(inputs):
        if is_templated(item):
            continue
        _check_item(item, index, allow_templates=True)


def load_inputs(inputs: Any) -> list[dict[str, Any]]:
    """The rendered ``inputs`` as a list of model inputs (a file is read here)."""
    if isinstance(inputs, (str, os.PathLike)):
        items = _read_file(inputs)
    elif isinstance(inputs, Sequence) and not isinstance(inputs, (bytes, Mapping)):
        items = list(inputs)
    else:
        raise ValueError(
            f"inputs must be a list of model inputs or a .jsonl/.csv file, got {type(inputs).__name__}: "
            f"{str(inputs)[:80]!r}"
        )
    if not items:
        raise ValueError("inputs holds no model input: a batch needs at least one")
    return [_check_item(item, index, allow_templates=False) for index, item in enumerate(items)]


def inputs_digest(items: Sequence[Mapping[str, Any]]) -> str:
    """A short digest of the whole list: a batch resumed after a deferral must still have the same inputs."""
    text = json.dumps(list(items), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_item(item: Any, index: int, *, allow_templates: bool) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise ValueError(f"inputs[{index}] must be a dict of model parameters, got {type(item).__name__}: {item!r:.80}")
    try:
        # File inputs (a Path or ObjectStoragePath in input_image) are read when the item is created.
        validate_input({k: v for k, v in item.items() if k not in FILE_INPUT_KEYS}, allow_templates=allow_templates)
    except ValueError as error:
        raise ValueError(f"inputs[{index}]: {error}") from None
    return dict(item)


def _file_format(location: Any) -> str:
    """``jsonl`` or ``csv`` from the file's name; a clear error for anything else."""
    text = str(location).strip()
    if not isinstance(location, ObjectStoragePath) and "://" not in text and not os.path.isabs(text):
        raise ValueError(
            f"inputs {text[:80]!r} is text but neither an absolute path nor a URL of a .jsonl or .csv file. "
            "Give the inputs as a list of dicts, an upstream task's output (XComArg), or a file such as "
            "'s3://bucket/prompts.jsonl'"
        )
    name = urlsplit(text).path.lower() if "://" in text else text.lower()
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    raise ValueError(
        f"inputs file {text[:120]!r} must end in .jsonl, .ndjson or .csv (one model input per line or row)"
    )


def _read_file(location: Any) -> list[Any]:
    kind = _file_format(location)
    path = location if isinstance(location, ObjectStoragePath) else ObjectStoragePath(str(location).strip())
    shown = str(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ValueError(f"inputs file {shown} does not exist") from None
    except Exception as error:  # noqa: BLE001 - an unknown scheme, a missing connection: fsspec raises many types
        raise ValueError(f"cannot read inputs file {shown} through Airflow object storage: {error}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"inputs file {shown} is over {MAX_FILE_BYTES} bytes; split the batch")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"inputs file {shown} is not UTF-8 text: {error}") from None
    return _parse_jsonl(text, shown) if kind == "jsonl" else _parse_csv(text, shown)


def _parse_jsonl(text: str, shown: str) -> list[Any]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{shown} line {number} is not JSON: {error}") from None
        if not isinstance(item, dict):
            raise ValueError(f"{shown} line {number} must be a JSON object (a model input), got {type(item).__name__}")
        items.append(item)
    return items


def _parse_csv(text: str, shown: str) -> list[Any]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or not any(name and name.strip() for name in reader.fieldnames):
        raise ValueError(f"{shown} has no header row naming the input columns (e.g. prompt,aspect_ratio)")
    items = []
    for row in reader:
        if None in row:  # more cells than the header has names
            raise ValueError(f"{shown} line {reader.line_num} has more cells than the header names")
        item = {key.strip(): value for key, value in row.items() if key and key.strip() and value not in (None, "")}
        if item:
            items.append(item)
    return items
