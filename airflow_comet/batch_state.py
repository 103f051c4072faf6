"""Where a prediction batch stands, carried between the worker's runs in the deferral's kwargs.

Everything here is plain JSON (lists, strings, numbers) and compact: a deferred task's ``next_kwargs`` is
written to the metadata database at every deferral. Per item it keeps only what the final row needs:
the prediction id, its status and error, the predict time, the attempts and the files written (name,
size, sha256, type). The inputs themselves are rendered again at each resume and checked against a digest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_comet.manifest import outcome_row

__all__ = ["BatchState", "ProgressLog", "progress_line", "slim_prediction"]

#: Keys of a prediction object a batch keeps from a status answer (not its logs, nor the input echoed back).
_KEPT_KEYS = ("id", "model", "status", "error", "output", "metrics", "created_at", "completed_at")
#: Version of the kwargs layout; a resume with another one fails clearly rather than misreading it.
VERSION = 1


def slim_prediction(prediction: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The parts of a prediction a batch uses (trigger events and kwargs stay small)."""
    if not isinstance(prediction, Mapping):
        return None
    return {key: prediction[key] for key in _KEPT_KEYS if key in prediction}


@dataclass
class BatchState:
    """A batch's progress: which items run, which wait, which ended and how.

    ``running`` rows are ``[index, prediction_id, created_epoch, attempts]``; ``queue`` rows are ``[index,
    attempts]`` (items to create again after a failed attempt, before new ones); ``done`` rows are ``[index,
    status, prediction_id, error, predict_time, attempts, files]`` with files ``[extension, size, sha256,
    content_type]`` (a file's name is ``<prediction id>-<position>.<extension>``, as persist_outputs writes
    it). Items from ``next`` on were never tried. About 170 bytes of JSON per finished item.
    """

    total: int
    digest: str
    started_at: float
    end_time: float | None = None
    task_timeout: bool = False
    next: int = 0
    queue: list[list[Any]] = field(default_factory=list)
    running: list[list[Any]] = field(default_factory=list)
    done: list[list[Any]] = field(default_factory=list)
    #: Why no more items are created (a fatal create error, the deadline); ``None`` while they are.
    halted: str | None = None
    timed_out: bool = False
    #: Rounds of creates in a row that CometAPI told to wait (a 429), each waited out in the triggerer.
    create_waits: int = 0
    logged_at: float = 0.0
    logged_step: int = -1
    version: int = VERSION

    # -- (de)serialisation ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> BatchState:
        version = data.get("version") if isinstance(data, Mapping) else None
        if version != VERSION:
            raise ValueError(f"Unexpected batch state from the deferral: {type(data).__name__}, version {version!r}")
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})

    # -- counts ----------------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Items not created yet (never tried, or queued to be created again)."""
        return self.total - self.next + len(self.queue)

    @property
    def succeeded(self) -> int:
        return sum(1 for row in self.done if row[1] == "succeeded")

    @property
    def finished(self) -> bool:
        return not self.running and (self.halted is not None or not self.waiting)

    def progress(self) -> dict[str, Any]:
        """The counts a trigger needs for its own progress lines."""
        succeeded = self.succeeded
        return {
            "total": self.total,
            "succeeded": succeeded,
            "failed": len(self.done) - succeeded,
            "waiting": 0 if self.halted else self.waiting,
            "started_at": self.started_at,
        }

    # -- changes ---------------------------------------------------------------------------------------

    def take(self) -> tuple[int, int] | None:
        """The next item to create and its attempts so far (queued retries first), or ``None``."""
        if self.halted is not None:
            return None
        if self.queue:
            index, attempts = self.queue.pop(0)
            return int(index), int(attempts)
        if self.next < self.total:
            self.next += 1
            return self.next - 1, 0
        return None

    def start(self, index: int, prediction_id: str, created: float, attempts: int) -> None:
        self.running.append([index, prediction_id, created, attempts])

    def stop(self, index: int) -> tuple[str, float, int]:
        """Take ``index`` off the running list; its prediction id, creation time and attempts."""
        for position, row in enumerate(self.running):
            if row[0] == index:
                del self.running[position]
                return row[1], row[2], row[3]
        raise KeyError(f"item {index} is not running")

    def finish(
        self,
        index: int,
        status: str,
        prediction: Mapping[str, Any] | None,
        attempts: int,
        *,
        error: str | None = None,
        files: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        prediction = prediction or {}
        metrics = prediction.get("metrics")
        if not isinstance(metrics, Mapping):
            metrics = {}
        kept = [
            [str(f["path"]).rsplit(".", 1)[-1], f["size"], f["sha256"], f["content_type"]]
            for f in sorted(files, key=lambda record: record.get("index", 0))
        ]
        self.done.append([index, status, prediction.get("id"), error, metrics.get("predict_time"), attempts, kept])

    def progress_due(self, now: float) -> str | None:
        """The progress line when one is due (every 30 s and every tenth of the batch, and at the end)."""
        reporter = ProgressLog(self.total, last_at=self.logged_at, last_step=self.logged_step)
        if not (reporter.due(len(self.done), now) or self.finished):
            return None
        self.logged_at, self.logged_step = reporter.last_at, reporter.last_step
        succeeded = self.succeeded
        return progress_line(
            self.total,
            succeeded,
            len(self.done) - succeeded,
            len(self.running),
            0 if self.halted else self.waiting,
            now - self.started_at,
        )

    def halt(self, reason: str) -> None:
        if self.halted is None:
            self.halted = reason

    # -- the result ------------------------------------------------------------------------------------

    def rows(self, inputs: Sequence[Any], model: str, folder: Any = None) -> list[dict[str, Any]]:
        """One manifest row per input, in input order (``folder``: where the files were written)."""
        by_index = {int(row[0]): row for row in self.done}
        rows = []
        for index, model_input in enumerate(inputs):
            done = by_index.get(index)
            if done is None:
                reason = self.halted or "it was never created"
                rows.append(outcome_row(index, model_input, None, error=f"not run: {reason}", attempts=0))
                continue
            _, status, prediction_id, error, predict_time, attempts, kept = done
            prediction = {
                "id": prediction_id,
                "model": model if prediction_id else None,
                "status": status,
                "metrics": {"predict_time": predict_time},
            }
            files = [
                {
                    "path": str(folder / f"{prediction_id}-{position}.{extension}"),
                    "size": size,
                    "sha256": sha256,
                    "content_type": content_type,
                    "index": position,
                }
                for position, (extension, size, sha256, content_type) in enumerate(kept)
            ]
            rows.append(outcome_row(index, model_input, prediction, files, error=error, attempts=attempts))
        return rows


def progress_line(total: int, succeeded: int, failed: int, running: int, waiting: int, elapsed: float) -> str:
    """``412/1000 succeeded, 3 failed, 64 running, 521 waiting; about 3 min left``."""
    line = f"{succeeded}/{total} succeeded, {failed} failed, {running} running, {waiting} waiting"
    ended, left = succeeded + failed, running + waiting
    if ended and left and elapsed > 0:
        seconds = left * elapsed / ended
        if seconds < 60:
            line += "; under a minute left"
        elif seconds < 3600:
            line += f"; about {math.ceil(seconds / 60)} min left"
        else:
            line += f"; about {seconds / 3600:.1f} h left"
    return line


@dataclass
class ProgressLog:
    """When a progress line is due: every ``every`` seconds, and whenever another tenth of the batch ended."""

    total: int
    every: float = 30.0
    last_at: float = 0.0
    last_step: int = -1

    def due(self, ended: int, now: float) -> bool:
        step = ended * 10 // max(1, self.total)
        if step > self.last_step or now - self.last_at >= self.every:
            self.last_at, self.last_step = now, step
            return True
        return False
