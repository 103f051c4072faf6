"""How the hook's requests reach the API: which proxy, which CAs, which client certificate.

Decided once per connection lookup (``ConnectionSettings.proxy`` / ``.verify`` / ``.cert``) and applied to
both transports alike: the worker's requests session (with requests' own environment handling switched off)
and the triggerer's aiohttp session (``trust_env`` off too), so a create and the status checks that follow
it always take the same route. The rules are requests' (``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY``
with ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``), with two differences: the connection's own extras win over the
environment, as in the http provider's ``HttpHook.run``, and a ``no_proxy`` inside the ``proxies`` extra
sends its hosts direct (requests would only drop the environment's proxies for them).

Both transports go through ``http://`` and ``https://`` proxies (credentials in the URL); any other kind
(socks) is a configuration error here, never a silent direct connection. With ``verify`` true both trust
certifi's CAs (:func:`trusted_cas`; requests' default), never the system store, so a company CA is added in
one place, the extra ``verify`` or ``REQUESTS_CA_BUNDLE``. A proxy's own certificate is checked against the
same CAs.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from airflow_comet.exceptions import CometAPIConfigError
from airflow_comet.hooks._masking import mask

__all__ = ["client_cert", "proxy_for", "tls_context", "trusted_cas", "verify_setting"]

#: The proxy kinds both transports can go through.
PROXY_SCHEMES = ("http", "https")

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
    if parts.scheme.lower() not in PROXY_SCHEMES:
        # Never the URL in the message: it may carry the password.
        raise CometAPIConfigError(
            f"Connection {conn_id!r}: the proxy for {base_url} is a {parts.scheme}:// proxy; only http:// and "
            "https:// proxies are supported"
        )
    # Masked as written and decoded; a user name alone is often a token.
    for secret in {parts.password, parts.username if parts.password is None else None}:
        if secret:
            mask(secret)
            mask(unquote(secret))
    return proxy


def verify_setting(conn_id: str, base_url: str, extras: Mapping[str, Any]) -> bool | str:
    """The extra ``verify`` (or ``verify_ssl``): ``True`` (certifi's CAs, or ``REQUESTS_CA_BUNDLE`` /
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


def client_cert(conn_id: str, base_url: str, extras: Mapping[str, Any]) -> str | tuple[str, str] | None:
    """The extra ``cert`` (requests' and the http provider's): the path of a PEM file holding the client
    certificate and its unencrypted key, or a ``[certificate, key]`` pair of paths; ``None`` when absent."""
    raw = extras.get("cert")
    if raw in (None, "", []):
        return None
    if isinstance(raw, str):
        paths: tuple[str, ...] = (raw.strip(),)
    elif isinstance(raw, (list, tuple)) and len(raw) == 2 and all(isinstance(p, str) and p.strip() for p in raw):
        paths = (raw[0].strip(), raw[1].strip())
    else:
        raise CometAPIConfigError(
            f"Connection {conn_id!r}: extra 'cert' must be the path of a PEM file with certificate and key, or "
            "a [certificate, key] pair of paths"
        )
    for path in paths:
        if not os.path.isfile(path):
            raise CometAPIConfigError(f"Connection {conn_id!r}: the client certificate file {path!r} does not exist")
    if not base_url.startswith("https://"):
        return None  # nothing to present on plain http
    return paths[0] if len(paths) == 1 else (paths[0], paths[1])


def trusted_cas(verify: bool | str) -> str | None:
    """The CA bundle (a file or a directory) both transports check certificates against: the one ``verify``
    names, else certifi's; ``None`` when nothing is checked."""
    if verify is False:
        return None
    if verify is True:
        import certifi  # requests' own default, so the worker's behaviour is the one documented

        return certifi.where()
    return verify


_tls_contexts: dict[tuple[bool | str, str | tuple[str, str] | None], ssl.SSLContext] = {}


def tls_context(verify: bool | str, cert: str | tuple[str, str] | None) -> ssl.SSLContext:
    """The triggerer's TLS settings as an ``SSLContext``: the CAs of :func:`trusted_cas` (or no check at all),
    hostname checked, the client certificate loaded. Built once per setting (loading CAs takes milliseconds
    of the event loop, and a session is built again whenever the connection changes)."""
    key = (verify, cert)
    context = _tls_contexts.get(key)
    if context is None:
        cas = trusted_cas(verify)
        try:
            if cas is None:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            elif os.path.isdir(cas):
                context = ssl.create_default_context(capath=cas)
            else:
                context = ssl.create_default_context(cafile=cas)
            if cert is not None:
                # No password prompt on a terminal the triggerer does not have: an encrypted key fails here.
                certfile, keyfile = (cert, None) if isinstance(cert, str) else cert
                context.load_cert_chain(certfile, keyfile, password=lambda: b"")
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError: an unreadable bundle or key
            raise CometAPIConfigError(f"cannot load the TLS settings ({error})") from None
        _tls_contexts[key] = context
    return context


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
