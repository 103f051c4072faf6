"""The one retry policy for every CometAPI request, sync or async, and the two loops that apply it.

:meth:`RetryPolicy.after_failure` decides after each failed attempt (wait this long, or give up with this
error); :func:`call_with_retries` (worker) and :func:`acall_with_retries` (triggerer) are the same few lines
around it, so both paths retry exactly the same answers.

Why not the http provider's retries: ``HttpHook.run_with_advanced_retry`` leaves the policy to the caller
and ``HttpAsyncHook`` retries only 5xx, never 429 nor connection errors, and ignores ``Retry-After``. The
loops themselves are a few lines, small enough not to need tenacity.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from airflow_comet.exceptions import (
    CometAPIAmbiguousCreateError,
    CometAPIError,
    CometAPIRetryLaterError,
    CometAPITransportError,
)

T = TypeVar("T")


class Logger(Protocol):
    """What the retry loops log through: a stdlib logger, or the structlog one of an Airflow 3 task."""

    def info(self, msg: str, /, *args: Any, **kwargs: Any) -> Any: ...

    def warning(self, msg: str, /, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how long to retry one request.

    :param max_retries: Retries after the first attempt (0 disables retrying).
    :param backoff_base: First backoff in seconds; doubles each retry, with full jitter.
    :param backoff_max: Upper bound for one exponential backoff.
    :param max_retry_wait: Upper bound for a server-requested ``Retry-After``.
    :param longest_sleep: A server-requested wait longer than this is not slept here: the error is raised
        as :class:`~airflow_comet.exceptions.CometAPIRetryLaterError`, for a caller that waits elsewhere.
    """

    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    max_retry_wait: float = 60.0
    longest_sleep: float | None = None

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

    def after_failure(
        self, error: CometAPIError, attempt: int, *, idempotent: bool, logger: Logger, what: str
    ) -> float:
        """After failed attempt number ``attempt`` (1-based): the seconds to wait before the next attempt.

        Raises the error to give up with (see :func:`final_error`) when ``error`` must not be retried or the
        retries are spent. Call it from the ``except`` block, so that the error keeps its traceback.
        """
        if attempt > self.max_retries or not self.should_retry(error, idempotent=idempotent):
            final = final_error(error, idempotent=idempotent, what=what)
            if final is error:
                raise error
            raise final from error
        delay = self.delay(attempt, error)
        retry_after = getattr(error, "retry_after", None)
        if self.longest_sleep is not None and retry_after is not None and retry_after > self.longest_sleep:
            raise CometAPIRetryLaterError(
                str(error), status_code=error.status_code, code=error.code, retryable=True, retry_after=delay
            ) from error
        logger.warning("%s failed (%s); retry %d of %d in %.2f s", what, error, attempt, self.max_retries, delay)
        return delay


def call_with_retries(send: Callable[[], T], *, policy: RetryPolicy, idempotent: bool, logger: Logger, what: str) -> T:
    """``send()`` until it returns, retrying the :class:`CometAPIError` s ``policy`` retries (blocking sleeps)."""
    attempt = 1
    while True:
        try:
            return send()
        except CometAPIError as error:
            delay = policy.after_failure(error, attempt, idempotent=idempotent, logger=logger, what=what)
        time.sleep(delay)
        attempt += 1


async def acall_with_retries(
    send: Callable[[], Awaitable[T]], *, policy: RetryPolicy, idempotent: bool, logger: Logger, what: str
) -> T:
    """Async :func:`call_with_retries` (the event loop runs on while it waits)."""
    attempt = 1
    while True:
        try:
            return await send()
        except CometAPIError as error:
            delay = policy.after_failure(error, attempt, idempotent=idempotent, logger=logger, what=what)
        await asyncio.sleep(delay)
        attempt += 1


def final_error(error: BaseException, *, idempotent: bool, what: str) -> BaseException:
    """The error to raise once retrying is over: an unanswered create becomes an explicit ambiguity."""
    if not idempotent and isinstance(error, CometAPITransportError) and error.maybe_sent:
        return CometAPIAmbiguousCreateError(
            f"{what}: no answer came back ({error}), but the request may have reached CometAPI and started a "
            "prediction. It was not sent again so that you are not billed twice; check your CometAPI "
            "dashboard before retrying the task."
        )
    return error
