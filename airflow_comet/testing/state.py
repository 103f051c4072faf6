"""The simulator's memory: predictions, the request log, fault state. Shared by both servers.

Predictions carry no timers: their status is computed from timestamps whenever someone asks, so
thousands of them cost nothing while they "run". Everything here is guarded by one lock because test
code reads it from other threads while the event loop thread writes it.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import string
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_comet.testing.faults import MODEL_DEFAULT, Faults, draw_duration
from airflow_comet.testing.models import ModelSpec

__all__ = ["Prediction", "RequestRecord", "SimulatorState", "iso8601"]

_ID_ALPHABET = string.ascii_lowercase + string.digits
_TERMINAL = ("succeeded", "failed", "canceled")
# The "starting" phase lasts ~10% of the run, at least 0.1 s, at most this long (so a prediction
# that never finishes still reaches "processing").
_MAX_STARTING = 3.0
_PROGRESS_STEPS = 4


def iso8601(epoch: float) -> str:
    """``2024-05-01T12:00:00.123Z``: UTC with milliseconds, as the API writes timestamps."""
    whole, millis = divmod(int(epoch * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


@dataclass(slots=True)  # one per request under load: slots keep it small and quick to build
class RequestRecord:
    """One request either server answered (admin requests are not recorded)."""

    time: float  #: epoch seconds when it arrived
    server: str  #: "api" or "delivery"
    method: str
    path: str
    query: str
    headers: dict[str, str]  #: as received, Authorization included: this is test tooling
    status: int  #: status answered; 499 if the client went away first
    endpoint: str  #: create/status/cancel/file/followed_url/misrouted/unknown
    prediction_id: str | None = None
    model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass
class Prediction:
    """One prediction; all times are ``time.monotonic()`` values unless named ``*_epoch``."""

    id: str
    model: str
    input: dict[str, Any]
    created_epoch: float
    created: float
    duration: float  #: seconds from creation to the end; inf = never
    fails: bool
    error_message: str
    seed: int
    single_output: bool = False
    canceled: float | None = None
    #: Set while a ``Prefer: wait`` create is waiting, so a cancel can wake it.
    changed: asyncio.Event | None = field(default=None, repr=False)
    #: Formatted timestamps and URLs, which never change once known (polls are the hot path).
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def _iso(self, key: str, mono: float) -> str:
        text = self._cache.get(key)
        if text is None:
            text = self._cache[key] = iso8601(self.epoch(mono))
        return text

    @property
    def num_outputs(self) -> int:
        return int(self.input.get("num_outputs", 1))

    @property
    def output_format(self) -> str:
        return str(self.input.get("output_format", "webp"))

    @property
    def starting_for(self) -> float:
        return min(max(0.1, 0.1 * self.duration), _MAX_STARTING, self.duration)

    @property
    def terminal(self) -> float | None:
        """Monotonic time at which it became (or will become) terminal; ``None`` if never."""
        if self.canceled is not None:
            return self.canceled
        return None if math.isinf(self.duration) else self.created + self.duration

    def epoch(self, mono: float) -> float:
        return self.created_epoch + (mono - self.created)

    def status(self, now: float) -> str:
        if self.canceled is not None:
            return "canceled"
        elapsed = now - self.created
        if elapsed >= self.duration:
            return "failed" if self.fails else "succeeded"
        return "processing" if elapsed >= self.starting_for else "starting"

    def output_urls(self, delivery: str) -> list[str]:
        ext = self.output_format
        return [f"{delivery}/v1/files/{self.id}/{i}.{ext}" for i in range(self.num_outputs)]

    def to_api(self, now: float, delivery: str, full: bool = True) -> dict[str, Any]:
        """The object the API answers. ``full=False`` is the create answer (no timing fields)."""
        status = self.status(now)
        out: Any = None
        if status == "succeeded":
            urls = self.output_urls(delivery)
            out = urls[0] if self.single_output else urls
        body: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "version": "hidden",
            "input": self.input,
            "logs": self._logs(status, now),
            "output": out,
            "data_removed": False,
            "error": self.error_message if status == "failed" else None,
            "source": "api",
            "status": status,
            "created_at": self._iso("created", self.created),
            "urls": self._urls(delivery),
        }
        if not full:
            return body
        started = self.created + self.starting_for
        began = status not in ("starting",) and (self.canceled is None or self.canceled >= started)
        end = self.terminal if status in _TERMINAL else None
        body["started_at"] = self._iso("started", started) if began else None
        body["completed_at"] = self._iso("completed", end) if end is not None else None
        body["metrics"] = {}
        if status in ("succeeded", "failed"):
            body["metrics"] = {"predict_time": round(self.duration - self.starting_for, 3)}
            if status == "succeeded":
                body["metrics"]["image_count"] = self.num_outputs
        return body

    def _urls(self, delivery: str) -> dict[str, str]:
        urls = self._cache.get("urls")
        if urls is None:
            # Like the real service, these point at another host than the API.
            urls = self._cache["urls"] = {
                "get": f"{delivery}/v1/predictions/{self.id}",
                "cancel": f"{delivery}/v1/predictions/{self.id}/cancel",
                "stream": f"{delivery}/v1/files/stream/{self.id}",
                "web": f"{delivery}/p/{self.id}",
            }
        return urls

    def _logs(self, status: str, now: float) -> str:
        if status == "starting" or (status == "canceled" and now - self.created < self.starting_for):
            return ""
        lines = [f"Using seed: {self.seed}", "Generating..."]
        run = max(self.duration - self.starting_for, 1e-9)
        done = min(1.0, (min(now, self.terminal or now) - self.created - self.starting_for) / run)
        for step in range(1, int(done * _PROGRESS_STEPS) + 1):
            lines.append(f"{100 * step // _PROGRESS_STEPS:3d}%| {step}/{_PROGRESS_STEPS} steps")
        if status == "failed":
            lines.append(f"Error: {self.error_message}")
        elif status == "succeeded":
            lines.append(f"Generated {self.num_outputs} image(s)")
        return "\n".join(lines) + "\n"


@dataclass
class _Armed:
    """Counters for faults that fire "the next N times"; re-armed whenever faults are set."""

    rate_limit_left: int = 0
    rate_limit_until: float = 0.0
    create_5xx_left: int = 0


class SimulatorState:
    """Everything the two servers share."""

    def __init__(
        self,
        models: Mapping[str, ModelSpec],
        faults: Faults,
        seed: int | None,
        log_limit: int | None,
    ) -> None:
        self.lock = threading.RLock()
        self.models = dict(models)
        self.seed = seed
        self.initial_faults = faults
        self.delivery_url = ""
        self._log_limit = log_limit
        self._id_rng = random.Random()  # ids stay unique across resets, so they are not seeded
        self.reset()

    # -- faults --------------------------------------------------------------------------------
    def set_faults(self, faults: Faults) -> None:
        with self.lock:
            self.faults = faults
            now = time.monotonic()
            # Keyed by model, None for the faults that govern every other model.
            self._armed: dict[str | None, _Armed] = {None: self._arm(faults, now)}
            for model, sub in faults.per_model.items():
                self._armed[model] = self._arm(sub, now)

    @staticmethod
    def _arm(faults: Faults, now: float) -> _Armed:
        return _Armed(
            rate_limit_left=faults.rate_limit_429,
            rate_limit_until=now + faults.rate_limit_429_seconds if faults.rate_limit_429_seconds else 0.0,
            create_5xx_left=faults.create_5xx_count,
        )

    def faults_for(self, model: str | None) -> tuple[Faults, str | None]:
        """The faults governing requests about ``model`` and the scope key of their counters."""
        with self.lock:
            if model is not None and model in self.faults.per_model:
                return self.faults.per_model[model], model
            return self.faults, None

    def take_rate_limit(self, scope: str | None) -> bool:
        """Whether this request falls in a 429 burst (and uses up one of its requests)."""
        with self.lock:
            armed = self._armed.get(scope)
            if armed is None:
                return False
            if armed.rate_limit_left > 0:
                armed.rate_limit_left -= 1
                return True
            return time.monotonic() < armed.rate_limit_until

    def take_create_5xx(self, scope: str | None) -> bool:
        with self.lock:
            armed = self._armed.get(scope)
            if armed is None or armed.create_5xx_left <= 0:
                return False
            armed.create_5xx_left -= 1
            return True

    def draw(self, rate: float) -> bool:
        """True with probability ``rate``; draws nothing when the rate is 0, so unrelated settings do
        not shift the seeded sequence."""
        if rate <= 0:
            return False
        with self.lock:
            return self.rng.random() < rate

    def choice(self, options: tuple[int, ...]) -> int:
        with self.lock:
            return self.rng.choice(options)

    # -- predictions ---------------------------------------------------------------------------
    def create_prediction(self, model: str, inputs: dict[str, Any], faults: Faults) -> Prediction:
        spec = self.models[model]
        with self.lock:
            duration_spec = faults.duration_spec(model)
            if duration_spec == MODEL_DEFAULT:
                duration_spec = spec.duration
            duration = math.inf if faults.never_finish else draw_duration(duration_spec, model, inputs, self.rng)
            fails = self.rng.random() < faults.fail_rate if faults.fail_rate > 0 else False
            fails = fails or _refused(inputs.get("prompt"), faults.refused_words)
            seed = inputs["seed"] if isinstance(inputs.get("seed"), int) else self.rng.randrange(1, 2**31)
            pid = self._new_id()
            prediction = Prediction(
                id=pid,
                model=model,
                input=inputs,
                created_epoch=time.time(),
                created=time.monotonic(),
                duration=duration,
                fails=fails,
                error_message=faults.fail_message,
                seed=seed,
                single_output=spec.single_output,
            )
            self.predictions[pid] = prediction
            return prediction

    def _new_id(self) -> str:
        while True:
            pid = "".join(self._id_rng.choices(_ID_ALPHABET, k=26))
            if pid not in self.predictions:
                return pid

    def get(self, pid: str) -> Prediction | None:
        with self.lock:
            return self.predictions.get(pid)

    def cancel(self, prediction: Prediction) -> None:
        with self.lock:
            now = time.monotonic()
            if prediction.status(now) not in _TERMINAL:
                prediction.canceled = now
                if prediction.changed is not None:
                    prediction.changed.set()

    def describe(self, prediction: Prediction) -> dict[str, Any]:
        """The API object as of now plus the simulator's own bookkeeping (``sim_*`` keys)."""
        with self.lock:
            body = prediction.to_api(time.monotonic(), self.delivery_url)
            body["input"] = dict(prediction.input)  # callers may mutate what they get
            end = prediction.terminal
            body["sim_duration"] = None if math.isinf(prediction.duration) else prediction.duration
            body["sim_terminal_monotonic"] = end
            body["sim_terminal_epoch"] = prediction.epoch(end) if end is not None else None
            return body

    # -- request log ---------------------------------------------------------------------------
    def record(self, entry: RequestRecord) -> None:
        with self.lock:
            self.log.append(entry)
            if entry.server == "api":
                self.per_second[int(entry.time)] += 1

    def connection_opened(self, server: str) -> None:
        with self.lock:
            self.connections[server] += 1

    def reset(self) -> None:
        """Forget predictions, the log and counters; restore the constructor's faults and seed."""
        with self.lock:
            self.rng = random.Random(self.seed)
            self.predictions: dict[str, Prediction] = {}
            self.log: collections.deque[RequestRecord] = collections.deque(maxlen=self._log_limit)
            self.per_second: collections.Counter[int] = collections.Counter()
            self.connections: collections.Counter[str] = collections.Counter()
            # Rendered files, oldest first; bounded because re-rendering gives identical bytes.
            self.images: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
            self.set_faults(self.initial_faults)


def _refused(prompt: Any, words: tuple[str, ...]) -> bool:
    """Whether a safety filter configured with ``words`` refuses ``prompt``."""
    text = prompt.lower() if isinstance(prompt, str) else ""
    return any(word.lower() in text for word in words)
