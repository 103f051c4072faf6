"""Keep output downloads out of the worker's own network: refuse private, loopback, link-local and other
non-public addresses, on the first request and on every redirect hop, and connect to the address checked.

Output URLs come from CometAPI's answers. A wrong, tampered or compromised answer, or a delivery host that
redirects, could otherwise point the worker at the cloud metadata service (169.254.169.254), at 127.0.0.1 or
at an internal service, and the persist operator would copy what it found into the user's bucket.

:class:`GuardedAdapter` is a requests transport adapter whose urllib3 connections resolve the host once
(one ``getaddrinfo`` call), check every address of the answer, and connect to a checked address: a second
DNS answer (DNS rebinding) is never asked for. The host name stays the connection's host, so TLS SNI,
certificate checks and the ``Host`` header are unchanged. Requests that go through an HTTP(S) proxy connect
to the proxy (the user's own choice), not to the output's host: the proxy resolves the name, so there the
check is what the worker can see (a literal address, or what its resolver answers); see docs/security.md.

Why not a library: ``advocate``, the requests-based one, has had no release since 2020 and predates
urllib3 2; the others found wrap httpx or the standard library client, or are new 0.x releases.
The classification is the ``ipaddress`` module's.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import SplitResult, urlsplit

from requests.adapters import HTTPAdapter
from requests.utils import select_proxy
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family, create_connection

__all__ = ["AddressPolicy", "AddressRefused", "GuardedAdapter", "parse_allowed_hosts"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAME_RE = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(Exception):
    """A download would connect to an address outside the public internet; nothing was sent there.

    Deliberately not an ``OSError``: urllib3 and requests would wrap that into a connection error, which
    the download loop retries.
    """

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint
        #: The URL of the request (a redirect hop, maybe) that was refused; set by :class:`GuardedAdapter`.
        self.url: str | None = None


def parse_allowed_hosts(raw: Any) -> tuple[str, ...]:
    """The extra ``allowed_output_hosts``, checked and normalised: host names (``mirror.corp.example``,
    ``*.corp.example`` for its subdomains) and address ranges (``10.1.0.0/16``, ``fd12::/48``, or one
    address). Takes a comma-separated string, a JSON list, or a JSON list written as a string (the form's
    text field). Raises a ValueError naming the entry that is neither."""
    if raw is None or raw == "":
        return ()
    if isinstance(raw, str) and raw.strip().startswith("["):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise ValueError(f"is not a valid JSON list: {raw[:80]!r}") from None
    if isinstance(raw, str):
        items: Iterable[Any] = raw.split(",")
    elif isinstance(raw, (list, tuple)):
        items = raw
    else:
        raise ValueError(f"must be a comma-separated string or a list, got {type(raw).__name__}")
    entries: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"entries must be strings, got {item!r}")
        text = item.strip().lower().rstrip(".")
        if not text:
            continue
        try:
            entry = str(ipaddress.ip_network(text.strip("[]"), strict=False))
        except ValueError:
            if not _NAME_RE.match(text):
                raise ValueError(
                    f"entry {item.strip()!r} is neither a host name (mirror.corp.example, *.corp.example) nor an "
                    "address range (10.1.0.0/16, fd12::/48); write host names without scheme, port or path"
                ) from None
            entry = text
        if entry not in entries:
            entries.append(entry)
    return tuple(entries)


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses output downloads may connect to: public ones, plus the exceptions a user configured.

    :param allowed_hosts: ``parse_allowed_hosts`` entries: names whose every address is allowed, and ranges.
    :param allow_loopback: Allow loopback addresses (the CometAPI connection's own host is loopback: the
        built-in simulator, a local test).
    :param conn_id: The CometAPI connection whose extra ``allowed_output_hosts`` a refusal points at.
    """

    allowed_hosts: tuple[str, ...] = ()
    allow_loopback: bool = False
    conn_id: str = "cometapi_default"

    @classmethod
    def for_connection(cls, conn_id: str, base_url: str, allowed_hosts: tuple[str, ...]) -> AddressPolicy:
        """The policy of a CometAPI connection: its allow list, and loopback if its base URL is loopback."""
        loopback = is_loopback_host(urlsplit(base_url).hostname)
        return cls(allowed_hosts=allowed_hosts, allow_loopback=loopback, conn_id=conn_id)

    @cached_property
    def _names(self) -> tuple[str, ...]:
        return tuple(e for e in self.allowed_hosts if _network(e) is None)

    @cached_property
    def _networks(self) -> tuple[IPNetwork, ...]:
        return tuple(n for n in map(_network, self.allowed_hosts) if n is not None)

    def _name_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(e == host or (e.startswith("*.") and host.endswith(e[1:])) for e in self._names)

    def refusal(self, host: str, address: str) -> str | None:
        """Why connecting to ``address`` (what ``host`` resolved to) is refused, or ``None`` if it is not."""
        if self._name_allowed(host):
            return None
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip in net or _unmapped(ip) in net for net in self._networks):
            return None
        if self.allow_loopback and _unmapped(ip).is_loopback:
            return None
        kind = _refused_kind(ip)
        if kind is None:
            return None
        where = f"{address} is" if host.strip("[]") == address else f"{host} resolves to {address},"
        return f"{where} {kind}"

    def hint(self) -> str:
        return (
            "Output files are only fetched from public addresses, so that a wrong or tampered answer cannot make "
            "the worker read its own network (cloud metadata, internal services). To allow a private mirror or "
            "a proxy that rewrites delivery URLs, add its host name or address range to the extra "
            f"'allowed_output_hosts' of the CometAPI connection {self.conn_id!r} (see docs/security.md)."
        )

    def check(self, host: str, addresses: Iterable[str]) -> None:
        """Raise :class:`AddressRefused` if any of ``addresses`` is refused: an answer that mixes public and
        private addresses is suspect as a whole."""
        for address in addresses:
            reason = self.refusal(host, address)
            if reason:
                raise AddressRefused(reason, self.hint())

    def resolve(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """Resolve ``host`` with one ``getaddrinfo`` call and check every address; the checked
        ``getaddrinfo`` entries, to connect to. ``socket.gaierror`` passes through."""
        infos = socket.getaddrinfo(host, port, allowed_gai_family(), socket.SOCK_STREAM)
        if not infos:
            raise socket.gaierror(f"no address for {host}")
        # An AF_INET or AF_INET6 sockaddr starts with the address as text (only AF_BLUETOOTH's is an int).
        self.check(host, [str(info[4][0]) for info in infos])
        return infos


def _network(entry: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(entry)
    except ValueError:
        return None


def _unmapped(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) stands for, else ``ip``."""
    return getattr(ip, "ipv4_mapped", None) or ip


def _refused_kind(ip: IPAddress) -> str | None:
    """What makes ``ip`` non-public, or ``None`` if it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv6 forms that reach an IPv4 address are judged by that address: IPv4-mapped (::ffff:a.b.c.d),
        # 6to4 (2002::/16) and NAT64 (64:ff9b::/96, what DNS64 answers on an IPv6-only network).
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return _refused_kind(embedded)
    if ip in _METADATA:
        return "the cloud metadata service (link-local)"
    for attribute, kind in (
        ("is_loopback", "a loopback address"),
        ("is_unspecified", "an unspecified address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
        ("is_private", "a private address"),
    ):
        if getattr(ip, attribute):
            return kind
    if not ip.is_global:
        return "not a globally routable address"
    return None


def _literal(host: str | None) -> IPAddress | None:
    """``host`` as an IP address if it is written as one, in any spelling a resolver accepts
    (``2130706433`` and ``0x7f000001`` are 127.0.0.1 to ``inet_aton``)."""
    if not host:
        return None
    host = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def is_loopback_host(host: str | None) -> bool:
    """Whether ``host`` is loopback without asking DNS: ``localhost`` (RFC 6761) or a loopback address."""
    if not host:
        return False
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    ip = _literal(name)
    return ip is not None and _unmapped(ip).is_loopback


class _GuardedConnectionMixin:
    """urllib3's ``_new_conn``, resolving through the policy and connecting only to checked addresses."""

    address_policy: AddressPolicy

    def _new_conn(self) -> socket.socket:
        conn: Any = self
        host = conn._dns_host
        try:
            infos = self.address_policy.resolve(host, conn.port)
        except socket.gaierror as e:
            raise NameResolutionError(conn.host, conn, e) from e
        error: Exception | None = None
        for info in infos:
            address = info[4][0]
            try:
                # A literal address: create_connection's own getaddrinfo parses it, it asks no DNS.
                sock = create_connection(
                    (address, conn.port),
                    conn.timeout,
                    source_address=conn.source_address,
                    socket_options=conn.socket_options,
                )
            except TimeoutError as e:
                error = ConnectTimeoutError(
                    conn, f"Connection to {conn.host} ({address}) timed out. (connect timeout={conn.timeout})"
                )
                error.__cause__ = e
            except OSError as e:
                error = NewConnectionError(conn, f"Failed to establish a new connection to {address}: {e}")
                error.__cause__ = e
            else:
                sys.audit("http.client.connect", conn, conn.host, conn.port)
                return sock
        assert error is not None
        raise error


def _pool_classes(policy: AddressPolicy) -> dict[str, type[HTTPConnectionPool]]:
    class GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
        address_policy = policy

    class GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
        address_policy = policy

    class GuardedHTTPConnectionPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    return {"http": GuardedHTTPConnectionPool, "https": GuardedHTTPSConnectionPool}


class GuardedAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose direct connections go only where ``policy`` allows (see the module doc).

    requests sends every redirect hop through the adapter again, so each hop is checked.
    """

    # Not a ClassVar: the requests stubs declare it per instance, and a ClassVar may not override that.
    __attrs__ = [*HTTPAdapter.__attrs__, "policy"]  # noqa: RUF012 - see above

    def __init__(self, policy: AddressPolicy, **kwargs: Any) -> None:
        self.policy = policy
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        # An instance attribute: urllib3's module-level default stays as it is for every other session.
        self.poolmanager.pool_classes_by_scheme = _pool_classes(self.policy)

    def send(
        self,
        request: Any,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> Any:
        try:
            if select_proxy(request.url, proxies or {}):
                self._check_proxied(urlsplit(request.url))
            return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)
        except AddressRefused as e:
            if e.url is None:
                e.url = request.url
            raise

    def _check_proxied(self, url: SplitResult) -> None:
        """Through a proxy the worker never connects to ``host``: the proxy resolves it. What the worker can
        still see is checked: a literal address, and its own resolver's answer when it has one (a worker
        behind a proxy often cannot resolve outside names at all: then the proxy decides)."""
        host = url.hostname or ""
        literal = _literal(host)
        if literal is not None:
            self.policy.check(host, [str(literal)])
            return
        try:
            self.policy.resolve(host, url.port or (443 if url.scheme == "https" else 80))
        except (socket.gaierror, UnicodeError):
            pass
