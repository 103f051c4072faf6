"""The errors both transports raise for what went wrong on the way, worded alike whichever one it was."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_comet.exceptions import CometAPICertificateError, CometAPIConfigError, CometAPITransportError

if TYPE_CHECKING:
    from airflow_comet.hooks._settings import ConnectionSettings

__all__ = ["certificate_error", "proxy_auth_error", "transport_error"]


def proxy_auth_error(settings: ConnectionSettings, refusal: str) -> CometAPIConfigError:
    """A proxy answered 407: not retried (new credentials are needed, not time)."""
    return CometAPIConfigError(f"Connection {settings.conn_id!r}: {refusal}; check the proxy's user name and password")


def certificate_error(settings: ConnectionSettings, reason: str) -> CometAPICertificateError:
    """The host's TLS certificate was not trusted: not retried (a CA is missing, which time does not fix), and
    the message says which setting to change."""
    return CometAPICertificateError(
        f"Connection {settings.conn_id!r}: the TLS certificate of {settings.base_url} was rejected ({reason}). "
        "If a proxy or gateway re-signs TLS with your company's CA, set the connection extra 'verify' to that "
        "CA bundle's path."
    )


def transport_error(
    settings: ConnectionSettings, method: str, path: str, what: str, error: BaseException, *, maybe_sent: bool
) -> CometAPITransportError:
    """No complete answer came back; ``maybe_sent`` says whether the request may have reached the server. The
    underlying error's text is kept short and never shows the proxy's password or the key."""
    detail = type(error).__name__
    text = _scrubbed(str(error), settings)
    if text:
        detail += f": {text[:200]}"
    return CometAPITransportError(f"{method} {path}: {what} ({detail})", maybe_sent=maybe_sent)


def _scrubbed(text: str, settings: ConnectionSettings) -> str:
    from urllib.parse import unquote, urlsplit

    secrets = [settings.api_key]
    if settings.proxy:
        parts = urlsplit(settings.proxy)
        secret = parts.password if parts.password is not None else parts.username  # a user name alone: a token
        if secret:
            secrets += [secret, unquote(secret)]
    for secret in secrets:
        if len(secret) >= 4 and secret in text:  # a shorter one would blank out ordinary words
            text = text.replace(secret, "***")
    return text
