"""Errors raised by the CometAPI hook, with the facts a person on call needs.

Every error carries ``retryable`` so that the one retry policy (``hooks/_retry.py``) can decide without
knowing which transport (requests in the worker, aiohttp in the triggerer) produced it. Messages never contain the
API key: they are built only from the status code, the content type, the API's own ``error`` envelope and the URL path.
"""

from __future__ import annotations

from airflow.providers.common.compat.sdk import AirflowException


class CometAPIError(AirflowException):
    """Base class for everything the CometAPI hook raises."""

    #: Whether sending the same request again may succeed.
    retryable: bool = False

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # CometAPI's HTTP status (None when it did not answer); AirflowException declares this name as the
        # HTTPStatus its own API server would answer with, which never applies to an error raised in a task.
        self.status_code = status_code  # type: ignore[assignment]  # see the comment above
        self.code = code


class CometAPIConfigError(CometAPIError):
    """The connection or an argument is wrong; nothing was sent."""


class CometAPICertificateError(CometAPIConfigError):
    """The host's TLS certificate was not trusted: a CA is missing (a setting to change), or, rarely, an edge
    serving a wrong certificate for a moment; a wait counts it like a 401 (three in a row end it)."""


class CometAPIResponseError(CometAPIError):
    """CometAPI answered with an HTTP error (or a body that is not what the API sends)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, code=code)
        self.retryable = retryable
        #: Seconds the server asked us to wait (``Retry-After``), already capped.
        self.retry_after = retry_after


class CometAPIRetryLaterError(CometAPIResponseError):
    """CometAPI asked to wait (429 ``Retry-After``) longer than the caller waits in place.

    Raised instead of sleeping when the request was made with a ``longest_sleep``: the operator then waits
    in the triggerer and sends the request again, so a rate-limit storm does not hold worker slots.
    """


class CometAPIAuthError(CometAPIResponseError):
    """401/403: the key is missing, wrong, revoked, or not allowed for this model."""


class CometAPINotFoundError(CometAPIResponseError):
    """404: the prediction (or model) does not exist for this key."""


class CometAPINotJSONError(CometAPIResponseError):
    """The answer was not JSON (an HTML page, a redirect): almost always a wrong host or path."""


class CometAPITransportError(CometAPIError):
    """The request did not get an HTTP answer (connection refused, reset, timed out).

    ``maybe_sent`` tells whether the server may have received (and acted on) the request: a connect
    failure cannot have reached it, a read timeout may have.
    """

    def __init__(self, message: str, *, maybe_sent: bool) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent
        self.retryable = True


class CometAPIAmbiguousCreateError(CometAPIError):
    """A create request may have reached CometAPI but no answer came back, so it was not retried.

    Retrying blindly could start (and bill) a second prediction.
    """


class PredictionFailedError(AirflowException):
    """The prediction ended in ``failed``, ``canceled`` or ``aborted``, or could not be followed."""
