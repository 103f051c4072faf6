"""The worker's transport: one ``requests`` session per hook, and what its failures mean.

Blocking, one request at a time, as a worker sends them (a create, a few status checks, a cancel). The
session takes the route of ``_route`` as decided for the connection (requests' own reading of the
environment is switched off, so that it cannot pick another proxy or CA bundle than the triggerer does).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from typing import Any, NamedTuple

import requests
import urllib3
from requests_toolbelt.adapters.socket_options import TCPKeepAliveAdapter  # a dependency of providers-http

from airflow_comet.hooks._errors import certificate_error, proxy_auth_error, transport_error
from airflow_comet.hooks._protocol import USER_AGENT
from airflow_comet.hooks._route import trusted_cas
from airflow_comet.hooks._settings import ConnectionSettings

__all__ = ["Answer", "BearerAuth", "new_session", "send"]

#: urllib3's words for a proxy that answered CONNECT with 407 (the rest of its message names paths and ports).
_PROXY_407 = re.compile(r"Tunnel connection failed: 407\b")


class Answer(NamedTuple):
    """One HTTP answer, whichever transport read it: headers are looked up by lower-case names."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class BearerAuth(requests.auth.AuthBase):
    """Sets ``Authorization: Bearer <key>``; its repr never shows the key."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(***)"


def new_session(settings: ConnectionSettings) -> requests.Session:
    """A keep-alive session that sends the connection's key to its host, the way ``_route`` decided."""
    session = requests.Session()
    # TCP keep-alive probes (HttpHook's settings): a long Prefer: wait hold is not dropped as idle by a NAT or
    # firewall on the way.
    adapter = TCPKeepAliveAdapter(idle=120, count=20, interval=30)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.auth = BearerAuth(settings.api_key)
    session.headers["User-Agent"] = USER_AGENT
    session.headers["Accept"] = "application/json"
    session.trust_env = False
    session.proxies = {"http": settings.proxy, "https": settings.proxy} if settings.proxy else {}
    session.verify = trusted_cas(settings.verify) or False
    session.cert = settings.cert
    return session


def send(
    session: requests.Session,
    settings: ConnectionSettings,
    method: str,
    path: str,
    body: Mapping[str, Any] | None,
    headers: Mapping[str, str] | None,
    hold: float,
) -> Answer:
    """Send one request; return its answer (any status), or raise what went wrong on the way."""
    try:
        response = session.request(
            method,
            settings.url(path),
            json=body,
            headers=dict(headers or {}),
            timeout=(settings.connect_timeout, settings.read_timeout + hold),
            # A redirect means a wrong host; following it could carry the key elsewhere.
            allow_redirects=False,
        )
    except requests.exceptions.ConnectTimeout as e:
        raise transport_error(settings, method, path, "connect timed out", e, maybe_sent=False) from None
    except requests.exceptions.ProxyError as e:
        if _PROXY_407.search(str(e)):
            raise proxy_auth_error(
                settings, f"the proxy refused the tunnel to {settings.base_url} (407 Proxy Authentication Required)"
            ) from None
        raise transport_error(settings, method, path, "connection to the proxy failed", e, maybe_sent=False) from None
    except requests.exceptions.ConnectionError as e:
        reasons = _reasons(e)
        if any(isinstance(r, ssl.SSLCertVerificationError) for r in reasons):
            raise certificate_error(settings, str(reasons[-1])) from None
        # Refused, unknown host (permanent or temporary), connect timeout: nothing was sent, so even a create
        # may be sent again. Anything else (a reset, a TLS error mid-answer) may have reached it.
        not_sent = any(isinstance(r, urllib3.exceptions.ConnectTimeoutError) for r in reasons)
        raise transport_error(
            settings, method, path, "connection failed", _urllib3_reason(reasons), maybe_sent=not not_sent
        ) from None
    except requests.exceptions.RequestException as e:
        # ReadTimeout, ChunkedEncodingError: the request was sent, the answer did not come back whole.
        raise transport_error(settings, method, path, "no complete answer", e, maybe_sent=True) from None
    return Answer(response.status_code, response.headers, response.content)


def _reasons(error: BaseException) -> list[BaseException]:
    """``error`` and what it wraps, outermost first: requests wraps urllib3's ``MaxRetryError``, whose
    ``reason`` is the real failure (``NameResolutionError``, ``SSLError``, ...), which wraps the OS's."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(chain) < 8 and all(current is not seen for seen in chain):
        chain.append(current)
        inner = getattr(current, "reason", None)  # ssl.SSLError's reason is a string, not an exception
        if not isinstance(inner, BaseException):
            first = current.args[0] if current.args else None
            inner = first if isinstance(first, BaseException) else None
        current = inner or current.__cause__ or current.__context__
    return chain


def _urllib3_reason(reasons: list[BaseException]) -> BaseException:
    """The failure worth naming: urllib3's own (it names the host and the OS error) rather than requests'
    wrapper, whose first 200 characters are the pool and the URL."""
    for reason in reasons:
        if isinstance(reason, urllib3.exceptions.HTTPError) and not isinstance(
            reason, urllib3.exceptions.MaxRetryError
        ):
            return reason
    return reasons[0]
