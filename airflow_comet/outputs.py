"""Download a prediction's output files: plain HTTP(S), streamed, bounded, checked, retried.

Output URLs point at a file-delivery host (a CDN), not at CometAPI: they are fetched with a fresh
session that never carries the CometAPI key nor any other ``Authorization`` header, and that connects only
to public addresses, on every redirect hop too (``_address_guard``; exceptions come from the CometAPI
connection: :func:`address_policy_for`). Every file is checked (status, Content-Type, size, Content-Length)
while it streams into a sink chosen by the caller, so nothing is published until the whole file has arrived
intact.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

import requests

from airflow_comet import __version__
from airflow_comet._address_guard import AddressPolicy, AddressRefused, GuardedAdapter
from airflow_comet.exceptions import CometAPIError
from airflow_comet.hooks._protocol import RETRYABLE_STATUS_CODES, parse_retry_after
from airflow_comet.hooks._retry import Logger, RetryPolicy, call_with_retries

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TIMEOUT",
    "Downloaded",
    "OutputDownloadError",
    "accepted_content_types",
    "address_policy_for",
    "check_output_url",
    "display_url",
    "download",
    "extension_for",
    "plain_session",
    "with_retries",
]

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
#: (connect, read) seconds; the read timeout is the longest silence between two chunks, not a total.
DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 60.0)
#: Bytes held in memory at once per download, whatever the file size.
CHUNK_SIZE = 1024 * 1024
_MAX_REDIRECTS = 5
_MAX_RETRY_WAIT = 60.0

Timeout = float | tuple[float, float]
T = TypeVar("T")

#: ``output_format`` input -> the Content-Type the file must be served with.
FORMAT_CONTENT_TYPES: dict[str, str] = {
    "webp": "image/webp",
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
}
#: Content-Type -> extension of the file we write. ``mimetypes`` covers the rest.
_EXTENSIONS: dict[str, str] = {
    "image/webp": "webp",
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/avif": "avif",
    "video/mp4": "mp4",
    "audio/mpeg": "mp3",
    "audio/wav": "wav",
}
_EXTENSION_RE = re.compile(r"^[a-z0-9]{1,10}$")


class OutputDownloadError(CometAPIError):
    """An output file could not be downloaded, or was not what the prediction promised.

    A :class:`~airflow_comet.exceptions.CometAPIError` so that the hook's one retry policy
    (:class:`~airflow_comet.hooks._retry.RetryPolicy`) decides on it from ``retryable`` alone.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class Downloaded:
    """What arrived: checked, counted and hashed while it streamed."""

    url: str
    content_type: str
    extension: str
    size: int
    sha256: str


def display_url(url: str) -> str:
    """``url`` without query string and fragment, for logs and errors: CDN URLs are often signed."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_output_url(url: Any, where: str) -> str:
    """Return ``url`` if it is a plain http(s) URL; raise a ValueError naming ``where`` otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{where} must be an http(s) URL, got {type(url).__name__}: {str(url)[:80]!r}")
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https"):
        shown = url[:60] + ("..." if len(url) > 60 else "")
        raise ValueError(
            f"{where} has scheme {parts.scheme or 'none'!r} ({shown!r}); only http:// and https:// output URLs "
            "are downloaded (file:, data:, ftp: and others are refused so a prediction cannot make the worker "
            "read local files or other services)"
        )
    if not parts.hostname:
        raise ValueError(f"{where} has no host: {display_url(url)!r}")
    if parts.username is not None or parts.password is not None:
        # requests would turn user:password@ into an Authorization header; output files need none.
        raise ValueError(f"{where} carries credentials in its host part; refusing to send them: {display_url(url)!r}")
    return url.strip()


def accepted_content_types(
    prediction_input: Mapping[str, Any] | None, override: Iterable[str] | str | None = None
) -> tuple[str, ...]:
    """The Content-Types an output may have: ``override``, else what ``output_format`` asked for,
    else any image (``image/*``)."""
    if override is not None:
        types = (override,) if isinstance(override, str) else tuple(override)
        cleaned = tuple(t.split(";")[0].strip().lower() for t in types if isinstance(t, str) and t.strip())
        if not cleaned:
            raise ValueError(f"expected_content_types must name at least one media type, got {override!r}")
        return cleaned
    fmt = (prediction_input or {}).get("output_format")
    if isinstance(fmt, str) and fmt.strip().lower() in FORMAT_CONTENT_TYPES:
        return (FORMAT_CONTENT_TYPES[fmt.strip().lower()],)
    return ("image/*",)


def _matches(media_type: str, accepted: tuple[str, ...]) -> bool:
    for pattern in accepted:
        if pattern.endswith("/*") and media_type.startswith(pattern[:-1]):
            return True
        if media_type == pattern:
            return True
    return False


def extension_for(media_type: str) -> str:
    """File extension (without the dot) for a media type; ``bin`` when nothing sensible is known."""
    ext = _EXTENSIONS.get(media_type) or (mimetypes.guess_extension(media_type) or "").lstrip(".")
    # Only plain lowercase alphanumerics: the extension becomes part of a path we write.
    return ext if _EXTENSION_RE.match(ext) else "bin"


class _NoAuth(requests.auth.AuthBase):
    """Sends no ``Authorization``; setting it also stops requests from reading ``~/.netrc``."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.pop("Authorization", None)
        return request


class _PlainSession(requests.Session):
    """A session that never sends credentials: not on the first request, not after a redirect."""

    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        # The default would look the redirect target up in ~/.netrc and add what it finds.
        prepared_request.headers.pop("Authorization", None)


def plain_session(policy: AddressPolicy | None = None) -> requests.Session:
    """A fresh session for output files: no key, no auth, environment proxies and CA bundles kept, and only
    the addresses ``policy`` allows (default: public addresses only)."""
    session = _PlainSession()
    adapter = GuardedAdapter(policy or AddressPolicy())
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.auth = _NoAuth()
    session.max_redirects = _MAX_REDIRECTS
    session.headers["User-Agent"] = f"airflow-comet/{__version__}"
    session.headers["Accept"] = "*/*"
    # Compressed transfer would make the received byte count differ from Content-Length.
    session.headers["Accept-Encoding"] = "identity"
    return session


def address_policy_for(conn_id: str, logger: Logger | None = None) -> AddressPolicy:
    """Where output files may be fetched from: public addresses, plus the exceptions of CometAPI connection
    ``conn_id`` (its extra ``allowed_output_hosts``; loopback when its own host is loopback). Without that
    connection, public addresses only."""
    from airflow.providers.common.compat.sdk import AirflowNotFoundException

    from airflow_comet.hooks.cometapi import CometAPIHook

    try:
        settings = CometAPIHook(cometapi_conn_id=conn_id).settings
    except AirflowNotFoundException:
        (logger or logging.getLogger(__name__)).info(
            "No connection %r: output files are fetched from public addresses only", conn_id
        )
        return AddressPolicy(conn_id=conn_id)
    return AddressPolicy.for_connection(conn_id, settings.base_url, settings.allowed_output_hosts)


def download(
    session: requests.Session,
    url: str,
    open_sink: Callable[[str], BinaryIO],
    *,
    accepted: tuple[str, ...],
    max_bytes: int,
    timeout: Timeout = DEFAULT_TIMEOUT,
) -> Downloaded:
    """One attempt at downloading ``url`` into ``open_sink(extension)``; the caller owns the sink.

    ``open_sink`` is only called once status and headers are acceptable, so a refused answer creates no
    file. Raises :class:`OutputDownloadError` (``retryable`` for transient failures).
    """
    shown = display_url(url)
    try:
        response = session.get(url, stream=True, timeout=timeout, allow_redirects=True)
    except AddressRefused as e:
        # Not retryable: the same answer would lead to the same address.
        hop = display_url(e.url) if e.url else shown
        via = f" (redirected to {hop})" if hop != shown else ""
        raise OutputDownloadError(f"Refusing to download {shown}{via}: {e.reason}. {e.hint}") from None
    except (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as e:
        raise OutputDownloadError(f"Cannot download {shown}: {type(e).__name__}: {e}") from None
    except requests.exceptions.TooManyRedirects:
        raise OutputDownloadError(f"Downloading {shown}: more than {_MAX_REDIRECTS} redirects") from None
    except requests.exceptions.RequestException as e:
        raise OutputDownloadError(f"Downloading {shown} failed: {type(e).__name__}", retryable=True) from e
    with response:
        final_url = display_url(response.url or url)
        _check_status(response, shown)
        media_type = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if not _matches(media_type, accepted):
            raise OutputDownloadError(
                f"{final_url} was served as {media_type or 'no Content-Type'!r}, expected "
                f"{' or '.join(accepted)} (from the prediction's output_format or expected_content_types); "
                "nothing was written"
            )
        expected_size = _content_length(response)
        if expected_size is not None and expected_size > max_bytes:
            raise OutputDownloadError(
                f"{final_url} is {expected_size} bytes (Content-Length), over the limit of {max_bytes} bytes "
                "(max_bytes); nothing was written"
            )
        extension = extension_for(media_type)
        sink = open_sink(extension)
        digest = hashlib.sha256()
        received = 0
        try:
            for chunk in response.iter_content(chunk_size=CHUNK_SIZE):
                received += len(chunk)
                if received > max_bytes:
                    raise OutputDownloadError(
                        f"{final_url} grew past the limit of {max_bytes} bytes (max_bytes) while downloading; "
                        "the download was aborted and nothing was written"
                    )
                digest.update(chunk)
                sink.write(chunk)
        except requests.exceptions.RequestException as e:
            # ChunkedEncodingError (urllib3 enforces Content-Length), ReadTimeout, a reset connection.
            raise OutputDownloadError(
                f"Download of {final_url} was cut off after {received} bytes ({type(e).__name__})", retryable=True
            ) from e
    if expected_size is not None and received != expected_size and not _encoded(response):
        raise OutputDownloadError(
            f"Download of {final_url} is truncated: {received} of {expected_size} bytes (Content-Length)",
            retryable=True,
        )
    if received == 0:
        raise OutputDownloadError(f"{final_url} answered an empty file", retryable=True)
    return Downloaded(url=url, content_type=media_type, extension=extension, size=received, sha256=digest.hexdigest())


def _check_status(response: requests.Response, shown: str) -> None:
    status = response.status_code
    if status == 200:
        return
    if status in RETRYABLE_STATUS_CODES:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), _MAX_RETRY_WAIT)
        raise OutputDownloadError(
            f"Downloading {shown}: the file host answered {status}",
            retryable=True,
            status_code=status,
            retry_after=retry_after,
        )
    hint = ""
    if status in (401, 403, 404, 410):
        hint = " (output files are only kept for a limited time after the prediction; they may have expired)"
    raise OutputDownloadError(f"Downloading {shown}: the file host answered {status}{hint}", status_code=status)


def _content_length(response: requests.Response) -> int | None:
    raw = response.headers.get("Content-Length")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def _encoded(response: requests.Response) -> bool:
    # With a Content-Encoding, Content-Length counts the encoded bytes, not the ones we write.
    return (response.headers.get("Content-Encoding") or "identity").strip().lower() != "identity"


def with_retries(func: Callable[[], T], *, policy: RetryPolicy, logger: Logger, what: str) -> T:
    """Run ``func`` under the hook's retry policy (same backoff and ``Retry-After`` handling)."""
    # Downloads change nothing on the server: always safe to send again.
    return call_with_retries(func, policy=policy, idempotent=True, logger=logger, what=what)
