"""Which models the simulator knows, and the input checks it applies to them."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from airflow_comet.testing.faults import DurationSpec
from airflow_comet.testing.images import ASPECT_RATIOS, CONTENT_TYPES

__all__ = ["DEFAULT_MODELS", "ModelSpec", "normalize_models", "validate_input"]

_FORMATS = tuple(CONTENT_TYPES)


@dataclass(frozen=True)
class ModelSpec:
    """How one simulated model behaves when no fault overrides it."""

    #: Default run time (see :data:`~airflow_comet.testing.faults.DurationSpec`).
    duration: DurationSpec = (1.0, 3.0)
    #: Accepts ``input_image`` (an http(s) URL or a ``data:`` URI) for image editing.
    image_input: bool = False
    #: ``output`` is one URL string instead of a list (off by default: CometAPI answers lists).
    single_output: bool = False


DEFAULT_MODELS: dict[str, ModelSpec] = {
    "black-forest-labs/flux-schnell": ModelSpec(duration=(1.0, 3.0)),
    "black-forest-labs/flux-dev": ModelSpec(duration=(3.0, 8.0)),
    "black-forest-labs/flux-1.1-pro": ModelSpec(duration=(4.0, 10.0)),
    "black-forest-labs/flux-kontext-pro": ModelSpec(duration=(4.0, 10.0), image_input=True),
}

ModelsArg = Mapping[str, ModelSpec | DurationSpec] | Iterable[str] | None


def normalize_models(models: ModelsArg) -> dict[str, ModelSpec]:
    """Accept ``None`` (the defaults), a list of names, or ``{name: ModelSpec | DurationSpec}``."""
    if models is None:
        return dict(DEFAULT_MODELS)
    if isinstance(models, Mapping):
        return {
            name: spec if isinstance(spec, ModelSpec) else ModelSpec(duration=spec, image_input=_edits(name))
            for name, spec in models.items()
        }
    return {name: DEFAULT_MODELS.get(name, ModelSpec(image_input=_edits(name))) for name in models}


def _edits(name: str) -> bool:
    return DEFAULT_MODELS.get(name, ModelSpec()).image_input


def validate_input(spec: ModelSpec, inputs: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(param, message)`` for the first invalid known input, or ``None``. Unknown keys are ignored,
    as the real service does."""
    prompt = inputs.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        return "input.prompt", "prompt must be a string"
    checks = (
        ("num_outputs", 1, 4),
        ("output_quality", 0, 100),
        ("seed", -(2**63), 2**63 - 1),
    )
    for key, low, high in checks:
        if key in inputs:
            value = inputs[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                return f"input.{key}", f"{key} must be an integer between {low} and {high}, got {value!r}"
    fmt = inputs.get("output_format")
    if fmt is not None and fmt not in _FORMATS:
        return "input.output_format", f"output_format must be one of {list(_FORMATS)}, got {fmt!r}"
    ratio = inputs.get("aspect_ratio")
    allowed = list(ASPECT_RATIOS) + (["match_input_image"] if spec.image_input else [])
    if ratio is not None and ratio not in allowed:
        return "input.aspect_ratio", f"aspect_ratio must be one of {allowed}, got {ratio!r}"
    if spec.image_input and inputs.get("input_image") is not None:
        problem = _image_ref_problem(inputs["input_image"])
        if problem:
            return "input.input_image", problem
    return None


def _image_ref_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "input_image must be an http(s) URL or a data: URI"
    if value.startswith(("http://", "https://")):
        return None
    if value.startswith("data:"):
        header, sep, payload = value.partition(",")
        if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
            return "input_image data URI must look like data:image/<type>;base64,<data>"
        try:
            base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return "input_image data URI does not hold valid base64"
        return None
    return "input_image must be an http(s) URL or a data: URI"
