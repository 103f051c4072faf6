"""Checks on user-supplied values, run at DAG parse time when the value is static and again after rendering.

Every error names the offending value and says what was expected, so a typo is caught before any request.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from airflow_comet.hooks._protocol import validate_model, validate_prediction_id

__all__ = [
    "is_templated",
    "validate_input",
    "validate_model",
    "validate_prediction_id",
    "validate_prefer_wait",
]


def is_templated(value: Any) -> bool:
    """Whether ``value`` will only be known at run time (Jinja text or an XCom reference)."""
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    # XComArg, MappedArgument and friends: anything Airflow resolves at run time.
    return hasattr(value, "resolve") and not isinstance(value, (Mapping, list, tuple))


def validate_input(value: Any, *, allow_templates: bool = False) -> dict[str, Any]:
    """Return ``value`` if it is a JSON object CometAPI can take as ``input``; raise ValueError otherwise.

    With ``allow_templates`` (parse time), values that are still Jinja or XCom references are accepted.
    """
    if not isinstance(value, Mapping):
        hint = ""
        if isinstance(value, str):
            # Most often a whole-input template ("{{ params.input }}"), which Jinja renders to text.
            hint = (
                ". A template renders to text: give input as a dict (Jinja renders inside its values), or set "
                "render_template_as_native_obj=True on the DAG"
            )
        raise ValueError(
            f"input must be a JSON object (a dict of model parameters such as {{'prompt': '...'}}), "
            f"got {type(value).__name__}: {_short(value)}{hint}"
        )
    _check_json(value, "input", allow_templates)
    return dict(value)


def validate_prefer_wait(value: Any) -> int:
    """``Prefer: wait`` takes whole seconds from 1 to 60 (Replicate's bounds)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 60:
        raise ValueError(f"prefer_wait must be a whole number of seconds from 1 to 60, got {value!r}")
    return value


def _check_json(value: Any, where: str, allow_templates: bool) -> None:
    if allow_templates and is_templated(value):
        return
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}, which cannot be sent as JSON")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a key {key!r} of type {type(key).__name__}; JSON keys are strings")
            _check_json(item, f"{where}[{key!r}]", allow_templates)
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]", allow_templates)
        return
    raise ValueError(
        f"{where} is a {type(value).__name__} ({_short(value)}), which cannot be sent as JSON; "
        "use strings, numbers, booleans, lists and dicts"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def json_size(value: Any) -> int:
    """Bytes ``value`` takes as compact JSON (used to keep XCom and logs small)."""
    return len(json.dumps(value, separators=(",", ":"), default=str))
