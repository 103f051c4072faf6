"""CometAPI's wire format, transport-free: URLs, settings, and what an answer means.

Both the requests-based (worker) and the aiohttp-based (triggerer) transports of the hook build their URLs
and read their answers here, so the two cannot drift apart. Nothing here reads the environment: what a
connection says, route included, is ``_settings``.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlsplit

from airflow_comet import __version__
from airflow_comet.exceptions import (
    CometAPIAuthError,
    CometAPINotFoundError,
    CometAPINotJSONError,
    CometAPIResponseError,
)

DEFAULT_HOST = "https://api.cometapi.com"
USER_AGENT = f"airflow-comet/{__version__}"
API_PREFIX = "/replicate/v1"

#: Statuses that may be followed by another answer. ``aborted`` is Replicate's own, not listed by CometAPI.
NON_TERMINAL_STATUSES = frozenset({"starting", "processing"})
FAILED_STATUSES = frozenset({"failed", "canceled", "aborted"})
TERMINAL_STATUSES = FAILED_STATUSES | {"succeeded"}

#: Answers that say "try again later". 502 is not in CometAPI's list but is what proxies send in front of it.
RETRYABLE_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504, 524})

# Replicate's model ids: owner and name, lowercase letters, digits, dots, dashes and underscores.
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Prediction ids are short alphanumeric tokens; anything else could change the path we send the key to.
_PREDICTION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_ERROR_TEXT_LIMIT = 300
# Retry-After's delay-seconds (RFC 9110: 1*DIGIT), a decimal fraction tolerated. ASCII digits only: float()
# would also take "nan", "inf", "-5", "1e3" and "1_0".
_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)


def validate_model(model: Any) -> str:
    """Return ``model`` if it is ``owner/name``; raise a ValueError naming the value otherwise."""
    if not isinstance(model, str) or not _MODEL_RE.match(model):
        raise ValueError(f"model must be 'owner/name' (for example 'black-forest-labs/flux-schnell'), got {model!r}")
    return model


def validate_prediction_id(prediction_id: Any) -> str:
    """Return ``prediction_id`` if it looks like a CometAPI prediction id; raise a ValueError otherwise."""
    if not isinstance(prediction_id, str) or not _PREDICTION_ID_RE.match(prediction_id):
        raise ValueError(
            f"prediction_id must be a CometAPI prediction id (letters, digits, '-' or '_'), got {prediction_id!r}"
        )
    return prediction_id


def create_path(model: str) -> str:
    owner, name = validate_model(model).split("/")
    return f"{API_PREFIX}/models/{quote(owner)}/{quote(name)}/predictions"


def prediction_path(prediction_id: str) -> str:
    return f"{API_PREFIX}/predictions/{validate_prediction_id(prediction_id)}"


def cancel_path(prediction_id: str) -> str:
    return f"{prediction_path(prediction_id)}/cancel"


def parse_retry_after(value: str | None, cap: float, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, capped at ``cap``; ``None`` to ignore it.

    The one reading of the header for every path (worker, triggerer, output downloads). Only what RFC 9110
    allows counts: a number of seconds (digits, a decimal fraction tolerated) or an HTTP date, a past one
    meaning now. Anything else (``nan``, ``inf``, ``-5``, words) is ignored, so the retry policy's own
    backoff applies: ``nan`` reached ``time.sleep`` as a ValueError, ``inf`` a wait of ``cap``.
    """
    if not value:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:  # "-0000": HTTP dates are GMT, never the worker's local time
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), cap)


def parse_answer(
    *,
    method: str,
    path: str,
    status: int,
    content_type: str,
    body: bytes,
    headers: Mapping[str, str],
    max_retry_wait: float,
) -> dict[str, Any]:
    """Turn one HTTP answer into the JSON object it carries, or raise the error it stands for.

    ``headers`` is looked up by lower-case names (a case-insensitive mapping, or a dict of lower-case names).
    """
    what = f"{method} {path}"
    mime = (content_type or "").split(";")[0].strip().lower()
    payload: Any = None
    if mime.endswith("json") or body[:1] in (b"{", b"["):
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            payload = None

    if 200 <= status < 300:
        if isinstance(payload, dict) and not _is_error_envelope(payload):
            return payload
        if isinstance(payload, dict):
            message, code = _envelope(payload)
            raise CometAPIResponseError(
                f"CometAPI answered {status} with an error to {what}: {message}", status_code=status, code=code
            )
        raise _not_json(what, status, mime, body, headers)

    if 300 <= status < 400:
        raise _not_json(what, status, mime, body, headers)

    retry_after = parse_retry_after(headers.get("retry-after"), max_retry_wait) if status == 429 else None
    if not isinstance(payload, dict):
        if status in RETRYABLE_STATUS_CODES:
            # Gateways (Cloudflare's 524, a load balancer's 502) answer HTML while CometAPI itself is busy.
            return _raise(
                CometAPIResponseError(
                    f"CometAPI answered {status} ({mime or 'no content type'}, not JSON) to {what}",
                    status_code=status,
                    retryable=True,
                    retry_after=retry_after,
                )
            )
        raise _not_json(what, status, mime, body, headers)

    message, code = _envelope(payload)
    text = f"CometAPI answered {status} to {what}: {message}" + (f" (code {code})" if code else "")
    if status in (401, 403):
        raise CometAPIAuthError(text, status_code=status, code=code)
    if status == 404:
        raise CometAPINotFoundError(text, status_code=status, code=code)
    # CometAPI reports some malformed requests as 500 with code invalid_request: sending it again cannot help.
    retryable = status in RETRYABLE_STATUS_CODES and code != "invalid_request"
    raise CometAPIResponseError(text, status_code=status, code=code, retryable=retryable, retry_after=retry_after)


def _raise(error: Exception) -> Any:
    raise error


def _is_error_envelope(payload: dict[str, Any]) -> bool:
    # A prediction object also has an "error" key (null or a string); the envelope's is an object.
    return isinstance(payload.get("error"), dict) and "id" not in payload


def _envelope(payload: dict[str, Any]) -> tuple[str, str | None]:
    error = payload.get("error")
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("type") or "no message")
        code = error.get("code") or None
        return message[:_ERROR_TEXT_LIMIT], (str(code) if code is not None else None)
    if isinstance(error, str) and error:
        return error[:_ERROR_TEXT_LIMIT], None
    detail = payload.get("detail") or payload.get("message")
    if detail:
        return str(detail)[:_ERROR_TEXT_LIMIT], None
    return "no error message in the answer", None


def _not_json(what: str, status: int, mime: str, body: bytes, headers: Mapping[str, str]) -> CometAPINotJSONError:
    location = headers.get("location")
    if mime.endswith("json") or body[:1] in (b"{", b"["):
        # JSON that does not parse came from the API itself (a wrong host answers HTML or a redirect):
        # blaming the host would send the user looking in the wrong place.
        hint = "The answer is JSON that does not parse (cut short or malformed): a fault at the API's side."
    else:
        hint = (
            "This usually means the connection's host is wrong: it must be the API's base URL "
            f"(for example {DEFAULT_HOST}), without a path."
        )
    redirect = f" redirecting to {urlsplit(location).netloc or location!r}" if location else ""
    snippet = body[:80].decode("utf-8", "replace").strip().replace("\n", " ")
    return CometAPINotJSONError(
        f"CometAPI answered {status}{redirect} with {mime or 'no content type'} instead of a JSON object to "
        f"{what} (starts with {snippet!r}). {hint}",
        status_code=status,
    )


def iso_epoch(raw: Any) -> float | None:
    """An API timestamp (``created_at``, ``completed_at``: ISO 8601) as epoch seconds; ``None`` if unreadable.

    Replicate writes nanoseconds (``2026-01-01T10:00:00.765994657Z``), which Python 3.10's ``fromisoformat``
    refuses (it takes 3 or 6 digits): the fraction is cut or padded to 6. No zone means UTC, never the
    worker's local time."""
    if not isinstance(raw, str):
        return None
    text = _FRACTION.sub(lambda m: (m[1] + "000000")[:7], raw.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


_FRACTION = re.compile(r"(\.\d+)")
