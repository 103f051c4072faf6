"""Fault configuration for the CometAPI simulator.

A :class:`Faults` value is plain configuration: which misbehaviours the simulator should show. The
state that some faults need (how many requests of a 429 burst are left, ...) lives in the simulator
and is re-armed every time faults are set.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BODY_FAULT_ENDPOINTS", "MODEL_DEFAULT", "DurationSpec", "Faults", "draw_duration"]

#: ``durations`` value meaning "use the model's own default duration".
MODEL_DEFAULT = "default"

#: Endpoints whose JSON answer the body faults (html_rate, truncated_json_rate, ...) may spoil.
BODY_FAULT_ENDPOINTS = ("create", "status", "cancel")

#: How long a prediction runs: seconds, a ``(min, max)`` uniform range, a callable returning seconds
#: (called with no arguments or with ``(model, input)``), ``None``/``inf`` for "never finishes", or
#: :data:`MODEL_DEFAULT`.
DurationSpec = float | int | tuple[float, float] | Callable[..., Any] | None | str

_RATE_FIELDS = ("fail_rate", "poll_5xx_rate", "html_rate", "truncated_json_rate")


@dataclass
class Faults:
    """Misbehaviours to inject. Every default means "behave like a healthy service".

    ``per_model`` maps a model name to a whole :class:`Faults` used *instead of* this one for requests
    about that model (creates for it, polls/cancels/downloads of its predictions).
    """

    # -- how predictions end -------------------------------------------------------------------
    #: One :data:`DurationSpec` for every model, or a mapping ``{model: DurationSpec}``.
    durations: DurationSpec | Mapping[str, DurationSpec] = MODEL_DEFAULT
    #: Fraction (0..1) of new predictions that end ``failed`` instead of ``succeeded``.
    fail_rate: float = 0.0
    fail_message: str = "NSFW content detected. Try running it again, or try a different prompt."
    #: A new prediction whose ``prompt`` contains one of these words (any case) ends ``failed`` with
    #: ``fail_message``, as a safety filter refuses a prompt: a test picks which prompts fail.
    refused_words: tuple[str, ...] = ()
    #: New predictions stay ``processing`` forever.
    never_finish: bool = False

    # -- rate limiting ---------------------------------------------------------------------------
    #: The next N API requests answer 429.
    rate_limit_429: int = 0
    #: Every API request during the next S seconds answers 429.
    rate_limit_429_seconds: float = 0.0
    #: Value of the ``Retry-After`` header on those 429s (whole seconds, rounded up).
    retry_after: float = 1.0
    #: Send ``Retry-After`` as an HTTP-date instead of delta-seconds.
    retry_after_http_date: bool = False

    # -- server errors ---------------------------------------------------------------------------
    #: Fraction of status polls answered with a 5xx drawn from ``poll_5xx_codes``.
    poll_5xx_rate: float = 0.0
    poll_5xx_codes: tuple[int, ...] = (500, 502, 503, 504, 524)
    #: The next N creates answer 503 without creating anything.
    create_5xx_count: int = 0
    #: Every create answers 500 with code ``invalid_request`` (nothing is created).
    invalid_request_500: bool = False
    #: Cancel answers 404 as an unknown route and cancels nothing (CometAPI does not document cancel).
    cancel_unsupported: bool = False

    # -- slowness ----------------------------------------------------------------------------------
    #: Status answers are delayed this long (read-timeout tests).
    slow_status_seconds: float = 0.0
    #: The create answer is delayed this long *after* the prediction exists (the ambiguous case).
    slow_create_seconds: float = 0.0

    # -- spoiled bodies (only on the endpoints in ``body_fault_endpoints``) -----------------------
    #: Fraction of answers replaced by an HTML page with a status from ``html_statuses``.
    html_rate: float = 0.0
    html_statuses: tuple[int, ...] = (200, 502)
    #: Fraction of answers whose JSON is cut in half (HTTP framing stays correct).
    truncated_json_rate: float = 0.0
    #: Keys dropped from the prediction object; ``True`` means ``("status",)``.
    missing_fields: tuple[str, ...] = ()
    #: Replace the status with this value (e.g. ``"weird"``).
    unknown_status: str | None = None
    #: Answer 200 with an error envelope instead of the prediction.
    error_envelope_200: bool = False
    body_fault_endpoints: tuple[str, ...] = ("status",)

    # -- output file downloads (delivery host) -------------------------------------------------
    file_404: bool = False
    #: Announce the full Content-Length, send half the bytes, then close the connection.
    file_truncated: bool = False
    #: Serve files with this Content-Type instead of the right one (e.g. ``"text/html"``).
    file_content_type: str | None = None
    #: Serve files of exactly this many bytes (the image, then zero padding), streamed in chunks.
    file_size_bytes: int | None = None

    per_model: dict[str, Faults] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept JSON-ish values (lists, dicts) so the admin endpoint and the constructor agree.
        for name in _RATE_FIELDS:
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Faults.{name} must be between 0 and 1, got {value!r}")
            setattr(self, name, value)
        if self.missing_fields is True:
            self.missing_fields = ("status",)
        elif self.missing_fields is False or self.missing_fields is None:
            self.missing_fields = ()
        elif isinstance(self.missing_fields, str):
            self.missing_fields = (self.missing_fields,)
        else:
            self.missing_fields = tuple(self.missing_fields)
        self.refused_words = (self.refused_words,) if isinstance(self.refused_words, str) else tuple(self.refused_words)
        self.poll_5xx_codes = tuple(int(c) for c in self.poll_5xx_codes)
        self.html_statuses = tuple(int(c) for c in self.html_statuses)
        if self.poll_5xx_rate and not self.poll_5xx_codes:
            raise ValueError("Faults.poll_5xx_codes must not be empty when poll_5xx_rate is set")
        if self.html_rate and not self.html_statuses:
            raise ValueError("Faults.html_statuses must not be empty when html_rate is set")
        self.body_fault_endpoints = tuple(self.body_fault_endpoints)
        unknown = set(self.body_fault_endpoints) - set(BODY_FAULT_ENDPOINTS)
        if unknown:
            raise ValueError(f"Faults.body_fault_endpoints: unknown {sorted(unknown)}, use {BODY_FAULT_ENDPOINTS}")
        for name in ("rate_limit_429", "create_5xx_count"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"Faults.{name} must be >= 0")
            setattr(self, name, int(getattr(self, name)))
        if self.file_size_bytes is not None and int(self.file_size_bytes) < 0:
            raise ValueError("Faults.file_size_bytes must be >= 0")
        if isinstance(self.durations, Mapping):
            self.durations = {str(m): _check_spec(s, f"durations[{m!r}]") for m, s in self.durations.items()}
        else:
            self.durations = _check_spec(self.durations, "durations")
        self.per_model = {
            str(model): value if isinstance(value, Faults) else Faults.from_dict(value)
            for model, value in dict(self.per_model or {}).items()
        }

    def duration_spec(self, model: str) -> DurationSpec:
        """The duration spec for ``model`` (:data:`MODEL_DEFAULT` when not configured here)."""
        if isinstance(self.durations, Mapping):
            return self.durations.get(model, MODEL_DEFAULT)
        return self.durations

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faults:
        """Build from JSON fields (the admin endpoint's body); unknown keys raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"faults must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Faults fields {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (callables are shown by their repr)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "per_model":
                value = {m: v.to_dict() for m, v in value.items()}
            elif f.name == "durations" and isinstance(value, Mapping):
                value = {m: _spec_json(s) for m, s in value.items()}
            elif f.name == "durations":
                value = _spec_json(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _check_spec(spec: Any, where: str) -> DurationSpec:
    if spec is None or spec == MODEL_DEFAULT or callable(spec):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if spec < 0:
            raise ValueError(f"Faults.{where} must be >= 0, got {spec!r}")
        return float(spec)
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        low, high = float(spec[0]), float(spec[1])
        if not 0 <= low <= high:
            raise ValueError(f"Faults.{where} range must satisfy 0 <= min <= max, got {spec!r}")
        return (low, high)
    raise ValueError(
        f"Faults.{where}: expected seconds, a (min, max) pair, a callable, None or {MODEL_DEFAULT!r}, got {spec!r}"
    )


def _spec_json(spec: DurationSpec) -> Any:
    if callable(spec):
        return repr(spec)
    if isinstance(spec, float) and math.isinf(spec):
        return None  # JSON has no infinity; null means "never finishes" here too.
    return list(spec) if isinstance(spec, tuple) else spec


def draw_duration(spec: DurationSpec, model: str, inputs: Mapping[str, Any], rng: random.Random) -> float:
    """Seconds a new prediction runs for (``math.inf`` = never finishes). ``spec`` is not MODEL_DEFAULT."""
    if spec is None:
        return math.inf
    if callable(spec):
        value = spec(model, inputs) if _wants_args(spec) else spec()
        return math.inf if value is None else max(0.0, float(value))
    if isinstance(spec, tuple):
        return rng.uniform(spec[0], spec[1])
    return float(spec)


def _wants_args(func: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: call them bare
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)
