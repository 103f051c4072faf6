"""How the hook's requests reach the API: which proxy, and how TLS certificates are checked.

Decided once per connection lookup (``ConnectionSettings.proxy`` / ``.verify``) and applied to both
transports: the worker's requests session (with requests' own environment handling switched off) and the
triggerer's ``_http1`` pool, so a create and the status checks that follow it always take the same route.
The rules are requests' (``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` with ``NO_PROXY``,
``REQUESTS_CA_BUNDLE``), with two differences: the connection's own extras win over the environment, as in
the http provider's ``HttpHook.run``, and a ``no_proxy`` inside the ``proxies`` extra sends its hosts direct
(requests would only drop the environment's proxies for them). Two things stay apart: with ``verify`` true
the worker trusts certifi's CAs (requests' default) and the triggerer the system's (``SSL_CERT_FILE``); and
the triggerer goes through ``http://`` proxies only (``_http1``; for another kind it connects directly, as
before it read proxies at all, and says so in its log).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from airflow_comet.exceptions import CometAPIConfigError
from airflow_comet.hooks._masking import mask

__all__ = ["proxy_for", "verify_setting"]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def proxy_for(conn_id: str, base_url: str, extras: Mapping[str, Any]) -> str | None:
    """The proxy URL for ``base_url`` (always with its scheme), or ``None``: the connection's extra ``proxies`` (requests' mapping,
    ``{"https": "http://proxy:3128"}``, or one URL, as ``proxy`` too), then, unless the extra ``trust_env`` is
    false, the environment's proxy variables with ``NO_PROXY``."""
    import requests.utils

    configured = extras.get("proxies", extras.get("proxy"))
    if configured in (None, ""):
        proxies: dict[str, str] = {}
    elif isinstance(configured, str):  # one proxy for everything (aiohttp's form, HttpAsyncHook's extra)
        proxies = {"http": configured, "https": configured}
    elif isinstance(configured, Mapping):
        proxies = {str(k).lower(): str(v) for k, v in configured.items() if v}
    else:
        raise CometAPIConfigError(
            f"Connection {conn_id!r}: extra 'proxies' must be a URL or a mapping like "
            '{"https": "http://proxy:3128"}'
        )
    no_proxy = proxies.pop("no_proxy", None)
    if no_proxy and requests.utils.should_bypass_proxies(base_url, no_proxy=no_proxy):
        return None  # the extra's own no_proxy names this host: no proxy at all
    if _flag(conn_id, extras, "trust_env", True):
        for scheme, url in requests.utils.get_environ_proxies(base_url, no_proxy=no_proxy).items():
            proxies.setdefault(scheme, url)
    proxy = requests.utils.select_proxy(base_url, proxies)
    if not proxy:
        return None
    if "://" not in proxy:
        proxy = f"http://{proxy}"  # requests takes "host:port" for an http proxy; spelled out for both transports
    try:
        parts = urlsplit(proxy)
        parts.port  # noqa: B018 - raises on a malformed port (often an unencoded character of the password)
    except ValueError:
        # Never the URL nor the parser's message in the error: both may show the password.
        raise CometAPIConfigError(
            f"Connection {conn_id!r}: the proxy URL for {base_url} cannot be read; percent-encode any '/', "
            "'#', '?' or '@' in its user name or password"
        ) from None
    if not parts.hostname:
        raise CometAPIConfigError(f"Connection {conn_id!r}: the proxy URL for {base_url} has no host")
    # Masked as written and decoded; a user name alone is often a token.
    for secret in {parts.password, parts.username if parts.password is None else None}:
        if secret:
            mask(secret)
            mask(unquote(secret))
    return proxy


def verify_setting(conn_id: str, base_url: str, extras: Mapping[str, Any]) -> bool | str:
    """The extra ``verify`` (or ``verify_ssl``): ``True`` (the default CAs, or ``REQUESTS_CA_BUNDLE`` /
    ``CURL_CA_BUNDLE`` when ``trust_env``), ``False``, or the path of a CA bundle file or directory."""
    if not base_url.startswith("https://"):
        return True  # nothing to check on plain http: a stale bundle setting must not break it
    key = "verify" if "verify" in extras else "verify_ssl"
    raw = extras.get(key)
    if raw is None or raw == "":
        verify: bool | str = True
    elif isinstance(raw, str) and raw.strip().lower() not in (*_TRUE, *_FALSE):
        verify = raw.strip()
    else:
        verify = _flag(conn_id, extras, key, True)
    if verify is True and _flag(conn_id, extras, "trust_env", True):
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    if isinstance(verify, str) and not os.path.exists(verify):
        source = f"extra {key!r}" if extras.get(key) not in (None, "") else "REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE"
        raise CometAPIConfigError(f"Connection {conn_id!r}: the CA bundle {verify!r} ({source}) does not exist")
    return verify


def _flag(conn_id: str, extras: Mapping[str, Any], key: str, default: bool) -> bool:
    raw = extras.get(key)
    if raw is None or raw == "":  # absent, or a form field left empty
        return default
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise CometAPIConfigError(f"Connection {conn_id!r}: extra {key!r} must be true or false, got {raw!r}")
