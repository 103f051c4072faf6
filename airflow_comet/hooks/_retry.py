"""The one retry policy for every CometAPI request, sync or async.

The same tenacity ``retry``/``wait``/``stop`` objects drive ``tenacity.Retrying`` in the worker and
``tenacity.AsyncRetrying`` in the triggerer, so both paths retry exactly the same answers.

Why not the http provider's retries: ``HttpHook.run_with_advanced_retry`` leaves the policy to the caller
and ``HttpAsyncHook`` retries only 5xx, never 429 nor connection errors, and ignores ``Retry-After``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import tenacity

from airflow_comet.exceptions import CometAPIAmbiguousCreateError, CometAPIError, CometAPITransportError


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how long to retry one request.

    :param max_retries: Retries after the first attempt (0 disables retrying).
    :param backoff_base: First backoff in seconds; doubles each retry, with full jitter.
    :param backoff_max: Upper bound for one exponential backoff.
    :param max_retry_wait: Upper bound for a server-requested ``Retry-After``.
    """

    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    max_retry_wait: float = 60.0

    def should_retry(self, error: BaseException, *, idempotent: bool) -> bool:
        if not isinstance(error, CometAPIError) or not error.retryable:
            return False
        # A create that may have reached the server must not be sent again: it could bill twice.
        return idempotent or not (isinstance(error, CometAPITransportError) and error.maybe_sent)

    def delay(self, attempt: int, error: BaseException | None) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based)."""
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            # Honour the server, plus a little jitter so that every client it throttled does not return at once.
            return min(retry_after, self.max_retry_wait) + random.uniform(0, min(1.0, self.backoff_base))
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        # "Equal jitter": never less than half the ceiling, so retries do not collapse into a hot loop.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def tenacity_kwargs(self, *, idempotent: bool, logger: logging.Logger, what: str) -> dict[str, Any]:
        """Arguments for ``tenacity.Retrying`` and ``tenacity.AsyncRetrying`` alike."""

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            logger.warning(
                "%s failed (%s); retry %d of %d in %.2f s",
                what,
                error,
                state.attempt_number,
                self.max_retries,
                state.next_action.sleep if state.next_action else 0.0,
            )

        return {
            "retry": tenacity.retry_if_exception(lambda e: self.should_retry(e, idempotent=idempotent)),
            "wait": lambda state: self.delay(
                state.attempt_number, state.outcome.exception() if state.outcome else None
            ),
            "stop": tenacity.stop_after_attempt(self.max_retries + 1),
            "before_sleep": before_sleep,
            "reraise": True,
        }


def final_error(error: BaseException, *, idempotent: bool, what: str) -> BaseException:
    """The error to raise once retrying is over: an unanswered create becomes an explicit ambiguity."""
    if not idempotent and isinstance(error, CometAPITransportError) and error.maybe_sent:
        return CometAPIAmbiguousCreateError(
            f"{what}: no answer came back ({error}), but the request may have reached CometAPI and started a "
            "prediction. It was not sent again so that you are not billed twice; check your CometAPI "
            "dashboard before retrying the task."
        )
    return error
