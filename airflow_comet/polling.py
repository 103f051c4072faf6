"""What to do after each status check: the one decision function for every waiting loop.

The trigger (async, in the triggerer), the operator's blocking wait and the sensor's poke all feed their
poll results or errors in here and get back "sleep this long" or a finished event, so they cannot drift.
The loops only do the I/O.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from airflow_comet.exceptions import (
    CometAPIAuthError,
    CometAPICertificateError,
    CometAPIConfigError,
    CometAPIError,
    CometAPINotFoundError,
    CometAPITransportError,
)
from airflow_comet.hooks._protocol import NON_TERMINAL_STATUSES, TERMINAL_STATUSES

#: The statuses a finished wait reports (the ``status`` of every trigger event).
EVENT_STATUSES = frozenset({"succeeded", "failed", "canceled", "timeout", "error"})

#: While a prediction is young (most image predictions end within ``KNEE`` seconds) polls come every
#: ``YOUNG_GAP`` seconds, so a finish is noticed within about two seconds.
YOUNG_GAP = 1.7
KNEE = 10.0
#: The first status check comes one young gap after creation (the create answer was the status before it),
#: or ``poll_interval`` after it if that is shorter. Not sooner: a check at 1 s finds a prediction done only
#: if it took under a second, and costs every other prediction one more request, while the end of one that
#: took longer is noticed within a gap of it either way.
FIRST_POLL_DELAY = YOUNG_GAP
#: The gap between checks is never set under this, whatever ``poll_interval`` says (jitter moves each check a
#: little either way).
MIN_POLL_GAP = 1.0
#: Past the knee the gap grows with the prediction's age (a fraction of it), up to ``poll_interval``: a
#: 60 s prediction costs about a dozen status requests, a long one a request every ``poll_interval``.
POLL_GROWTH = 0.45
#: Jitter (a fraction of the delay) so that a mapped batch started together does not poll in lockstep.
POLL_JITTER = 0.1
#: A check this close to the deadline is the last one: a check sent a shade early (the shared poller's timer
#: takes the checks due within a few hundredths of a second) must not cost one more request just before it.
DEADLINE_SLACK = 0.05
#: A check due this long past the deadline is not sent: the wait times out at once (in the triggerer, checks
#: can queue behind slow answers or a tight request budget).
OVERDUE_GRACE = 5.0
#: "Persistent" for auth lost / prediction gone: this many answers in a row, not one blip.
MAX_FATAL_ERRORS = 3
#: Answers that make no sense (HTML, missing fields, unknown status) tolerated in a row before giving up.
MAX_BAD_ANSWERS = 10

_LARGE_VALUE = 1024
_KNOWN_STATUSES = NON_TERMINAL_STATUSES | TERMINAL_STATUSES  # built once, not per answer


def _longest_gap(poll_interval: float) -> float:
    """The longest gap the schedule may leave between checks: ``poll_interval``, never under ``MIN_POLL_GAP``."""
    return max(poll_interval, MIN_POLL_GAP)


def next_poll_delay(age: float, poll_interval: float, rng: random.Random | None = None) -> float:
    """Seconds until the next status check of a prediction that is ``age`` seconds old."""
    base = YOUNG_GAP if age < KNEE else max(YOUNG_GAP, age * POLL_GROWTH)
    base = min(base, _longest_gap(poll_interval))
    jitter = (rng or random).uniform(-POLL_JITTER, POLL_JITTER) * base
    return max(0.2, base + jitter)


@dataclass(frozen=True, slots=True)
class PollOutcome:
    """After one status check: an ``event`` when the wait is over, else the ``delay`` before the next.

    For the loops' logs, so that none has to track the last status itself: ``new_status`` is the
    prediction's status when this check found it changed (the first answer is a change from
    ``previous_status`` ``None``); ``problem`` says why an answer made no sense (it is tolerated a few
    times before the wait fails).
    """

    event: dict[str, Any] | None = None
    delay: float = 0.0
    new_status: str | None = None
    previous_status: str | None = None
    problem: str | None = None


@dataclass(slots=True)
class PredictionPoller:
    """
    Follows one prediction from its status answers to a final event.

    :param prediction_id: The prediction being waited on.
    :param started_at: Epoch seconds when the prediction was created (drives the poll schedule, so a
        trigger picked up again after a triggerer restart does not start over with fast polls).
    :param end_time: Epoch deadline; ``None`` waits for ever.
    :param poll_interval: The longest gap between two polls.
    """

    prediction_id: str
    started_at: float
    end_time: float | None = None
    poll_interval: float = 20.0
    #: Jitter source; ``None`` uses the ``random`` module (tests pass a seeded one).
    rng: random.Random | None = None
    polls: int = 0
    #: The last answer, large input values elided (see :attr:`last_prediction`).
    _last_answer: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    _fatal_errors: int = 0
    _bad_answers: int = 0
    _transient_errors: int = 0
    _last_error: str | None = None
    _last_status: str | None = None

    def first_delay(self, now: float) -> float:
        """Delay before the first poll: ``FIRST_POLL_DELAY`` after creation; at once for a young prediction picked
        up late; on the schedule for an old one (a restarted triggerer must not poll all of them at once)."""
        age = now - self.started_at
        first = min(FIRST_POLL_DELAY, _longest_gap(self.poll_interval))
        if age < first:
            return self._clip(first - age, now)
        if age < KNEE:
            return 0.0
        return self._clip(next_poll_delay(age, self.poll_interval, self.rng), now)

    def on_prediction(self, prediction: Any, now: float) -> PollOutcome:
        """Decide after a status check answered with ``prediction``."""
        self.polls += 1
        status = prediction.get("status") if isinstance(prediction, dict) else None
        if not isinstance(status, str) or status not in _KNOWN_STATUSES:
            return self._bad_answer(f"the answer has no known status (status={status!r})", now)
        self._last_answer = compact_prediction(prediction)  # a copy: the caller's changes do not reach it
        self._fatal_errors = self._bad_answers = self._transient_errors = 0
        self._last_error = None
        previous, self._last_status = self._last_status, status
        if status in NON_TERMINAL_STATUSES:
            outcome = self._keep_polling(now)
        else:
            outcome = PollOutcome(event=terminal_event(self.prediction_id, prediction))
        if status != previous:
            outcome = replace(outcome, new_status=status, previous_status=previous)
        return outcome

    def on_error(self, error: BaseException, now: float) -> PollOutcome:
        """Decide after a status check raised ``error`` (after the hook's own retries)."""
        self.polls += 1
        self._last_error = str(error)
        # A rejected certificate mid-wait may be an edge's moment: counted like a 401, not the end at once.
        if isinstance(error, CometAPIConfigError) and not isinstance(error, CometAPICertificateError):
            return PollOutcome(event=self._event("error", str(error)))
        if isinstance(error, (CometAPIAuthError, CometAPINotFoundError, CometAPICertificateError)):
            self._fatal_errors += 1
            if self._fatal_errors >= MAX_FATAL_ERRORS:
                return PollOutcome(
                    event=self._event(
                        "error",
                        f"Stopped waiting for prediction {self.prediction_id}: {self._fatal_errors} status "
                        f"checks in a row failed with: {error}",
                    )
                )
            return self._after_failed_check(error, now, self._fatal_errors)
        if isinstance(error, CometAPITransportError) or (isinstance(error, CometAPIError) and error.retryable):
            # A busy or unreachable API never fails a task before its deadline: the prediction may be fine.
            self._transient_errors += 1
            return self._after_failed_check(error, now, self._transient_errors)
        return self._bad_answer(str(error), now)

    @property
    def last_prediction(self) -> dict[str, Any] | None:
        """The prediction object of the last status answer (large input values elided), a new copy each time
        (a reader cannot change what the poller keeps); ``None`` before the first."""
        return copy.deepcopy(self._last_answer)

    @property
    def strikes(self) -> int:
        """Answers in a row that count towards giving up (auth lost, prediction gone, or nonsense); transient
        errors and good answers do not."""
        return max(self._fatal_errors, self._bad_answers)

    def timeout_if_overdue(self, now: float) -> PollOutcome | None:
        """The timeout, without another check, when this check comes ``OVERDUE_GRACE`` past the deadline."""
        if self.end_time is not None and now >= self.end_time + OVERDUE_GRACE:
            return PollOutcome(event=self.timeout_event(now))
        return None

    def timeout_event(self, now: float) -> dict[str, Any]:
        """The event for a deadline that passed while the prediction was still running."""
        deadline = datetime.fromtimestamp(self.end_time or now, tz=timezone.utc).isoformat(timespec="seconds")
        message = (
            f"Prediction {self.prediction_id} did not finish by its deadline ({deadline}, "
            f"{(self.end_time or now) - self.started_at:.0f} s after it was created); last status "
            f"{self._last_status or 'unknown'}."
        )
        if self._last_error:
            message += f" The last status check failed: {self._last_error}"
        return self._event("timeout", message)

    # -- internals ---------------------------------------------------------------------------------------

    def _bad_answer(self, reason: str, now: float) -> PollOutcome:
        self._bad_answers += 1
        self._last_error = reason
        if self._bad_answers >= MAX_BAD_ANSWERS:
            return PollOutcome(
                event=self._event(
                    "error",
                    f"Stopped waiting for prediction {self.prediction_id}: {self._bad_answers} answers in a row "
                    f"made no sense ({reason}).",
                )
            )
        return replace(self._keep_polling(now, after_error=self._bad_answers), problem=reason)

    def _after_failed_check(self, error: CometAPIError, now: float, in_a_row: int) -> PollOutcome:
        outcome = self._keep_polling(now, after_error=in_a_row)
        if outcome.event is not None:
            return outcome
        # Not sooner than the server asked (a 429's Retry-After also pauses the whole connection in the
        # triggerer), but never longer than poll_interval, the longest gap this wait promises.
        retry_after = min(getattr(error, "retry_after", None) or 0.0, self.poll_interval)
        return replace(
            outcome,
            delay=self._clip(max(outcome.delay, retry_after), now),
            problem=f"the status check failed ({error})",
        )

    def _keep_polling(self, now: float, after_error: int = 0) -> PollOutcome:
        if self.end_time is not None and now >= self.end_time - DEADLINE_SLACK:
            return PollOutcome(event=self.timeout_event(now))
        delay = next_poll_delay(now - self.started_at, self.poll_interval, self.rng)
        if after_error:
            # Back off on repeated errors too (capped at the poll interval): never a hot loop.
            delay = max(delay, min(self.poll_interval, 2.0 ** min(after_error, 6)))
        return PollOutcome(delay=self._clip(delay, now))

    def _clip(self, delay: float, now: float) -> float:
        # Wake up at the deadline rather than after it, so a timeout is reported on time.
        if self.end_time is not None:
            delay = min(delay, max(0.0, self.end_time - now))
        return delay

    def _event(self, status: str, message: str) -> dict[str, Any]:
        return {
            "status": status,
            "prediction_id": self.prediction_id,
            "prediction": self.last_prediction,
            "message": message,
        }


def terminal_event(prediction_id: str, prediction: dict[str, Any]) -> dict[str, Any]:
    """The event for a prediction that reached a terminal status."""
    status = prediction["status"]
    if status == "succeeded":
        message = f"Prediction {prediction_id} succeeded."
    else:
        error = prediction.get("error") or "no error message"
        message = f"Prediction {prediction_id} of {prediction.get('model', '?')} ended {status}: {error}"
    # Replicate's "aborted" (never started) is reported as a failure: it produced nothing.
    return {
        "status": "failed" if status == "aborted" else status,
        "prediction_id": prediction_id,
        "prediction": compact_prediction(prediction),
        "message": message,
    }


def is_terminal(prediction: dict[str, Any]) -> bool:
    return prediction.get("status") not in NON_TERMINAL_STATUSES


def compact_prediction(prediction: dict[str, Any]) -> dict[str, Any]:
    """The prediction object, with very large input values (data: URIs of input images) elided.

    Keeps trigger events and XCom small; the outputs and everything else are kept as they are.
    """
    data = _elided(prediction)
    return dict(data) if data is prediction else data


def _elided(prediction: dict[str, Any]) -> dict[str, Any]:
    """``prediction`` itself when no input value is large, else a copy with those elided."""
    inputs = prediction.get("input")
    if isinstance(inputs, dict):
        for value in inputs.values():
            if _is_large(value):
                return {**prediction, "input": {k: (_elide(v) if _is_large(v) else v) for k, v in inputs.items()}}
    return prediction


def _is_large(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) > _LARGE_VALUE
    if isinstance(value, list):
        return any(_is_large(v) for v in value)
    return False


def _elide(value: Any) -> Any:
    if isinstance(value, list):
        return [_elide(v) if _is_large(v) else v for v in value]
    return f"{value[:40]}... ({len(value)} characters elided)"
