"""What an Airflow connection of type ``cometapi`` says, parsed and checked once per lookup.

The route (proxy, TLS checks, client certificate) is decided here too, through ``_route``, which reads the
environment: both transports take these settings as they are, so a create and its status checks go the same
way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from airflow_comet.exceptions import CometAPIConfigError
from airflow_comet.hooks._protocol import API_PREFIX, DEFAULT_HOST
from airflow_comet.hooks._route import client_cert, proxy_for, verify_setting

__all__ = ["ConnectionSettings", "base_url_from"]


@dataclass(frozen=True)
class ConnectionSettings:
    """Everything the hook needs from an Airflow connection, parsed once and checked.

    The key is kept out of ``repr`` so that logging a settings object cannot leak it.
    """

    conn_id: str
    base_url: str
    api_key: str
    connect_timeout: float = 10.0
    # CometAPI notes a status query that took over 45 s to answer: a shorter read timeout would turn a
    # slow but healthy answer into a retry storm.
    read_timeout: float = 90.0
    max_retries: int = 6
    max_retry_wait: float = 60.0
    retry_backoff: float = 1.0
    max_requests_per_second: float | None = None
    #: The proxy both transports use for ``base_url`` (``_route.proxy_for``; may hold a password).
    proxy: str | None = None
    #: Check TLS against the default CAs (True), a CA bundle path, or not (False) (``_route.verify_setting``).
    verify: bool | str = True
    #: The client certificate both transports present: a PEM file holding certificate and key, or the two
    #: files (``_route.client_cert``).
    cert: str | tuple[str, str] | None = None
    #: Host names and address ranges output downloads may reach although they are not public
    #: (``_address_guard.parse_allowed_hosts``): a private mirror, a proxy that rewrites delivery URLs.
    allowed_output_hosts: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"ConnectionSettings(conn_id={self.conn_id!r}, base_url={self.base_url!r}, api_key=***)"

    def url(self, path: str) -> str:
        return self.base_url + path

    @classmethod
    def from_connection(cls, conn: Any, extras: Mapping[str, Any]) -> ConnectionSettings:
        """Build settings from a Connection and its (already parsed) extras.

        ``extras`` is passed separately because the triggerer must read them without a blocking call.
        """
        conn_id = getattr(conn, "conn_id", None) or "?"
        api_key = (getattr(conn, "password", None) or "").strip()
        if not api_key:
            raise CometAPIConfigError(
                f"Connection {conn_id!r} has no CometAPI key: put the key in the connection's password "
                'field (AIRFLOW_CONN_..._=\'{"conn_type": "cometapi", "password": "<key>"}\').'
            )
        if not all("!" <= c <= "~" for c in api_key):
            # Keys are printable ASCII. Checked here, for both transports: requests would fail with a bare
            # UnicodeEncodeError, or send a broken header. Never the key in the message.
            raise CometAPIConfigError(
                f"Connection {conn_id!r}: the CometAPI key holds a space, a line break or a character that is "
                "not plain ASCII (often an invisible one pasted with it); paste the key again."
            )
        base_url = base_url_from(conn_id, getattr(conn, "host", None), getattr(conn, "port", None))
        return cls(
            conn_id=conn_id,
            base_url=base_url,
            api_key=api_key,
            proxy=proxy_for(conn_id, base_url, extras),
            verify=verify_setting(conn_id, base_url, extras),
            cert=client_cert(conn_id, base_url, extras),
            allowed_output_hosts=_allowed_output_hosts(conn_id, extras),
            connect_timeout=_positive(conn_id, extras, "connect_timeout", cls.connect_timeout),
            read_timeout=_positive(conn_id, extras, "read_timeout", cls.read_timeout),
            max_retries=int(_positive(conn_id, extras, "max_retries", cls.max_retries, allow_zero=True)),
            max_retry_wait=_positive(conn_id, extras, "max_retry_wait", cls.max_retry_wait),
            retry_backoff=_positive(conn_id, extras, "retry_backoff", cls.retry_backoff),
            max_requests_per_second=(
                _positive(conn_id, extras, "max_requests_per_second", 0.0)
                if extras.get("max_requests_per_second") not in (None, "")
                else None
            ),
        )


def base_url_from(conn_id: str, host: str | None, port: int | None) -> str:
    """Normalise the connection's host into ``scheme://host[:port][/path]`` with no trailing slash."""
    host = (host or "").strip() or DEFAULT_HOST
    if "://" not in host:
        host = f"https://{host}"
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CometAPIConfigError(
            f"Connection {conn_id!r} has host {host!r}; expected a base URL like {DEFAULT_HOST!r}."
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise CometAPIConfigError(
            f"Connection {conn_id!r}: the host must be a plain base URL without credentials, query or fragment."
        )
    netloc = parts.netloc
    if port and not parts.port:
        netloc = f"{netloc}:{port}"
    path = parts.path.rstrip("/")
    if path.endswith(API_PREFIX):
        # Users often paste the documented URL prefix; it is added per request.
        path = path[: -len(API_PREFIX)]
    return f"{parts.scheme}://{netloc}{path}"


def _positive(conn_id: str, extras: Mapping[str, Any], key: str, default: float, allow_zero: bool = False) -> float:
    raw = extras.get(key)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise CometAPIConfigError(f"Connection {conn_id!r}: extra {key!r} must be a number, got {raw!r}") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise CometAPIConfigError(f"Connection {conn_id!r}: extra {key!r} must be positive, got {raw!r}")
    return value


def _allowed_output_hosts(conn_id: str, extras: Mapping[str, Any]) -> tuple[str, ...]:
    from airflow_comet._address_guard import parse_allowed_hosts  # it builds on requests: loaded when needed

    try:
        return parse_allowed_hosts(extras.get("allowed_output_hosts"))
    except ValueError as e:
        raise CometAPIConfigError(f"Connection {conn_id!r}: extra 'allowed_output_hosts' {e}") from None
