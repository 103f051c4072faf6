"""Output downloads never reach the worker's own network: private, loopback, link-local, metadata and other
non-public addresses are refused before any connection, on redirects too, and the connection goes to the
address that was checked.

Every name is resolved by a stub (no DNS), and any attempt to connect outside 127.0.0.0/8 fails the test, so
a broken check cannot send traffic anywhere: the file hosts and the proxy are real servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from airflow_comet._address_guard import AddressPolicy, is_loopback_host, parse_allowed_hosts
from airflow_comet.exceptions import CometAPIConfigError
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.operators.persist import PersistPredictionOutputOperator
from airflow_comet.outputs import OutputDownloadError
from tests.conftest import set_connection
from tests.http_proxy import HttpProxy
from tests.scripted_server import Answer, ScriptedServer

PUBLIC_API = "https://api.cometapi.example"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(200)
_real_getaddrinfo = socket.getaddrinfo
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


# -- the safety net: a stub resolver, and no connection outside 127.0.0.0/8 -------------------------------


class Resolver:
    """``socket.getaddrinfo`` for the names a test lists: each call takes the next answer (the last one
    repeats); an answer is a list of addresses, or an exception to raise. Literal addresses are parsed as
    the real resolver would; any other name does not resolve. Records every host asked for."""

    def __init__(self) -> None:
        self.names: dict[str, list[Any]] = {}
        self.asked: list[str] = []

    def __call__(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> list:
        host = host.decode() if isinstance(host, bytes) else host
        self.asked.append(host)
        if host in self.names:
            answers = self.names[host]
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
            if isinstance(answer, BaseException):
                raise answer
            return [_info(address, port) for address in answer]
        return _real_getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, flags | socket.AI_NUMERICHOST)

    def count(self, host: str) -> int:
        return self.asked.count(host)


def _info(address: str, port: Any) -> tuple:
    port = int(port or 0)
    if ipaddress.ip_address(address).version == 6:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))


@pytest.fixture(autouse=True)
def resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Resolver]:
    stub = Resolver()
    monkeypatch.setattr(socket, "getaddrinfo", stub)
    yield stub


@pytest.fixture(autouse=True)
def outside(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every attempt to connect outside 127.0.0.0/8: it fails on the spot, and the test at its end."""
    attempts: list[Any] = []

    def allowed(address: Any) -> bool:
        if not isinstance(address, tuple):
            return True  # a Unix socket path
        try:
            return ipaddress.ip_address(address[0]) in ipaddress.ip_network("127.0.0.0/8")
        except ValueError:
            return False  # a name: sockets are only ever given addresses by the code under test

    def connect(self: socket.socket, address: Any) -> None:
        if not allowed(address):
            attempts.append(address)
            raise AssertionError(f"connection attempt outside 127.0.0.0/8: {address!r}")
        return _real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if not allowed(address):
            attempts.append(address)
            raise AssertionError(f"connection attempt outside 127.0.0.0/8: {address!r}")
        return _real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempts
    assert attempts == [], "a download tried to connect outside loopback"


@pytest.fixture
def public_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cometapi_default`` on a public host: no loopback exception, no allow list."""
    set_connection(monkeypatch, PUBLIC_API)


@pytest.fixture
def file_host() -> Iterator[ScriptedServer]:
    with ScriptedServer() as server:
        server.script(Answer(status=200, body=PNG, content_type="image/png"))
        yield server


def persist(tmp_path: Path, *urls: str, **kwargs: Any) -> list[dict[str, Any]]:
    kwargs.setdefault("retry_backoff", 0.01)
    kwargs.setdefault("download_retries", 3)
    prediction = {"id": "addr01", "status": "succeeded", "input": {"output_format": "png"}, "output": list(urls)}
    operator = PersistPredictionOutputOperator(
        task_id="persist", prediction=prediction, destination=(tmp_path / "out").as_uri() + "/", **kwargs
    )
    return operator.execute({})


def written(tmp_path: Path) -> list[str]:
    folder = tmp_path / "out"
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# -- refused: every non-public range, in every spelling -----------------------------------------------------

REFUSED_LITERALS = [
    ("http://127.0.0.1:8080/x.png", "127.0.0.1 is a loopback address"),
    ("http://127.9.9.9/x.png", "a loopback address"),
    ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "the cloud metadata service"),
    ("http://169.254.1.1/x.png", "a link-local address"),
    ("http://10.0.0.5/x.png", "a private address"),
    ("http://172.16.3.4/x.png", "a private address"),
    ("http://192.168.1.10/x.png", "a private address"),
    ("http://100.64.0.1/x.png", "not a globally routable address"),  # carrier-grade NAT
    ("http://0.0.0.0:8080/x.png", "an unspecified address"),
    ("http://224.0.0.1/x.png", "a multicast address"),
    ("http://240.0.0.1/x.png", "a reserved address"),
    ("http://[::1]/x.png", "::1 is a loopback address"),
    ("http://[::]/x.png", "an unspecified address"),
    ("http://[fe80::1]/x.png", "a link-local address"),
    ("http://[fd00::1]/x.png", "a private address"),
    ("http://[fc12:3456::1]/x.png", "a private address"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "the cloud metadata service"),
    ("http://[ff02::1]/x.png", "a multicast address"),
    ("http://[::ffff:127.0.0.1]/x.png", "a loopback address"),  # IPv4-mapped IPv6
    ("http://[::ffff:169.254.169.254]/", "the cloud metadata service"),
    ("http://[::ffff:10.0.0.1]/x.png", "a private address"),
    ("http://[2002:a00:1::]/x.png", "a private address"),  # 6to4 of 10.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/", "the cloud metadata service"),  # NAT64 of 169.254.169.254
    ("http://2130706433/x.png", "2130706433 resolves to 127.0.0.1, a loopback address"),  # decimal
    ("http://0x7f000001/x.png", "0x7f000001 resolves to 127.0.0.1, a loopback address"),  # hex
    ("http://0177.0.0.1/x.png", "resolves to 127.0.0.1, a loopback address"),  # octal
    ("http://127.1/x.png", "resolves to 127.0.0.1, a loopback address"),  # short form
    ("http://0xa9fea9fe/latest/meta-data/", "resolves to 169.254.169.254, the cloud metadata service"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED_LITERALS)
def test_every_non_public_address_is_refused_before_connecting_and_not_retried(
    public_api, resolver, tmp_path, url, reason
):
    host = urlsplit(url).hostname
    with pytest.raises(OutputDownloadError) as failure:
        persist(tmp_path, url + "?X-Amz-Signature=secret", download_retries=3)
    message = str(failure.value)
    assert message.startswith(f"Refusing to download {url}: ")
    assert reason in message and "allowed_output_hosts" in message and "'cometapi_default'" in message
    assert "secret" not in message  # the query string is left out
    assert resolver.count(host) == 1  # checked once: a refusal is final, not retried
    assert written(tmp_path) == []


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (["169.254.169.254"], "images.evil.example resolves to 169.254.169.254, the cloud metadata service"),
        (["10.20.30.40"], "resolves to 10.20.30.40, a private address"),
        (["fd00::7"], "resolves to fd00::7, a private address"),
        (["::ffff:192.168.0.1"], "resolves to ::ffff:192.168.0.1, a private address"),
        # A mixed answer is refused as a whole: the public address is not tried either.
        (["93.184.215.14", "10.0.0.1"], "resolves to 10.0.0.1, a private address"),
    ],
)
def test_a_host_name_resolving_to_a_refused_address_is_refused(public_api, resolver, tmp_path, answer, reason):
    resolver.names["images.evil.example"] = [answer]
    expected = f"Refusing to download http://images.evil.example/a.png: .*{reason}"
    with pytest.raises(OutputDownloadError, match=expected):
        persist(tmp_path, "http://images.evil.example/a.png")
    assert resolver.count("images.evil.example") == 1


def test_without_a_cometapi_connection_only_public_addresses_are_allowed(monkeypatch, file_host, tmp_path):
    monkeypatch.delenv("AIRFLOW_CONN_COMETAPI_DEFAULT", raising=False)
    with pytest.raises(OutputDownloadError, match=r"127\.0\.0\.1 is a loopback address"):
        persist(tmp_path, f"{file_host.url}/a.png")
    assert file_host.seen == []


# -- redirects: every hop is checked -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "names", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/iam/security-credentials/role", {}, "the cloud metadata service"),
        ("http://internal.corp.example:8080/admin?token=t0p", {"internal.corp.example": [["10.1.2.3"]]},
         "internal.corp.example resolves to 10.1.2.3, a private address"),
        ("http://[::ffff:127.0.0.1]:9000/", {}, "a loopback address"),
    ],
)
def test_a_redirect_from_an_allowed_host_to_a_refused_one_is_refused(
    monkeypatch, resolver, tmp_path, location, names, reason
):
    # The first host is a name in the allow list (resolved to the loopback server): the hop is not.
    set_connection(monkeypatch, PUBLIC_API, allowed_output_hosts="cdn.allowed.example")
    resolver.names.update({"cdn.allowed.example": [["127.0.0.1"]], **names})
    with ScriptedServer() as cdn:
        cdn.script(Answer(status=302, body="", headers={"Location": location}))
        port = cdn.url.rsplit(":", 1)[1]
        with pytest.raises(OutputDownloadError) as failure:
            persist(tmp_path, f"http://cdn.allowed.example:{port}/out.png?sig=abc", download_retries=3)
        assert len(cdn.seen) == 1  # the refusal is final: no retry
    shown_hop = location.split("?")[0]
    message = str(failure.value)
    assert message.startswith(
        f"Refusing to download http://cdn.allowed.example:{port}/out.png (redirected to {shown_hop}): "
    )
    assert reason in message and "sig=abc" not in message and "t0p" not in message
    assert written(tmp_path) == []


def test_a_redirect_to_an_allowed_host_is_followed(monkeypatch, resolver, file_host, tmp_path):
    set_connection(monkeypatch, PUBLIC_API, allowed_output_hosts=["cdn.allowed.example", "files.allowed.example"])
    resolver.names.update({"cdn.allowed.example": [["127.0.0.1"]], "files.allowed.example": [["127.0.0.1"]]})
    port = file_host.url.rsplit(":", 1)[1]
    with ScriptedServer() as cdn:
        cdn.script(Answer(status=302, body="", headers={"Location": f"http://files.allowed.example:{port}/s.png"}))
        cdn_port = cdn.url.rsplit(":", 1)[1]
        [record] = persist(tmp_path, f"http://cdn.allowed.example:{cdn_port}/out.png")
    assert record["size"] == len(PNG) and [s.path for s in file_host.seen] == ["/s.png"]
    assert file_host.seen[0].headers["Host"] == f"files.allowed.example:{port}"


# -- DNS rebinding: the connection goes to the address checked ---------------------------------------------


def test_the_connection_goes_to_the_checked_address_not_a_second_answer(monkeypatch, resolver, file_host, tmp_path):
    # Allowed by range, not by name, so the address matters; a second lookup would answer the metadata address.
    set_connection(monkeypatch, PUBLIC_API, allowed_output_hosts="127.0.0.0/29")
    resolver.names["rebind.example"] = [["127.0.0.1"], ["169.254.169.254"]]
    port = file_host.url.rsplit(":", 1)[1]
    [record] = persist(tmp_path, f"http://rebind.example:{port}/a.png")
    assert record["size"] == len(PNG)
    assert resolver.count("rebind.example") == 1  # resolved once; the connect used that answer
    assert file_host.seen[0].headers["Host"] == f"rebind.example:{port}"  # the name is kept for the host


def test_tls_is_checked_against_the_host_name_while_connecting_to_the_checked_address(
    monkeypatch, resolver, tmp_path
):
    import ssl

    from benchmarks._tls_proxy import make_certificate

    cert, key = make_certificate(tmp_path, "secure.allowed.example")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    set_connection(monkeypatch, PUBLIC_API, allowed_output_hosts="*.allowed.example")
    resolver.names.update({"secure.allowed.example": [["127.0.0.1"]], "other.allowed.example": [["127.0.0.1"]]})
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    sni: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: sni.append(name)
    with ScriptedServer() as server:
        server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
        server.script(Answer(status=200, body=PNG, content_type="image/png"))
        port = server.url.rsplit(":", 1)[1]
        [record] = persist(tmp_path, f"https://secure.allowed.example:{port}/a.png")
        assert record["size"] == len(PNG) and sni == ["secure.allowed.example"]
        assert server.seen[0].headers["Host"] == f"secure.allowed.example:{port}"
        # The certificate is checked against the URL's name, not the address connected to.
        with pytest.raises(OutputDownloadError, match="SSLError"):
            persist(tmp_path, f"https://other.allowed.example:{port}/a.png", download_retries=0)


# -- exceptions: the allow list and the loopback API ---------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "host", "ok"),
    [
        ("mirror.corp.example", "mirror.corp.example", True),
        ("MIRROR.corp.example.", "mirror.corp.example", True),
        ("other.example, *.corp.example", "a.mirror.corp.example", True),
        ('["*.corp.example"]', "corp.example", False),  # a wildcard is for subdomains only
        ("mirror.corp.example", "mirror.corp.example.evil.example", False),
        ("127.0.0.0/29", "pool.example", True),
        ("127.0.0.1", "pool.example", True),
        ("127.0.1.0/24, 10.0.0.0/8", "pool.example", False),
        ("", "pool.example", False),
    ],
)
def test_the_allow_list_takes_names_and_address_ranges(monkeypatch, resolver, file_host, tmp_path, allowed, host, ok):
    set_connection(monkeypatch, PUBLIC_API, allowed_output_hosts=allowed)
    resolver.names[host] = [["127.0.0.1"]]
    url = f"http://{host}:{file_host.url.rsplit(':', 1)[1]}/a.png"
    if ok:
        [record] = persist(tmp_path, url)
        assert record["size"] == len(PNG)
    else:
        with pytest.raises(OutputDownloadError, match=f"{host} resolves to 127.0.0.1, a loopback address"):
            persist(tmp_path, url)
        assert file_host.seen == []


def test_an_allowed_address_literal_is_downloaded(monkeypatch, file_host, tmp_path):
    set_connection(monkeypatch, PUBLIC_API, allowed_output_hosts="127.0.0.1/32")
    [record] = persist(tmp_path, f"{file_host.url}/a.png")
    assert record["size"] == len(PNG)


@pytest.mark.parametrize("api", ["http://127.0.0.1:9", "http://localhost:9", "http://[::1]:9"])
def test_a_loopback_api_allows_loopback_outputs_and_nothing_else(monkeypatch, resolver, file_host, tmp_path, api):
    set_connection(monkeypatch, api)
    resolver.names["localhost"] = [["127.0.0.1"]]
    port = file_host.url.rsplit(":", 1)[1]
    [one] = persist(tmp_path, f"{file_host.url}/a.png")
    [two] = persist(tmp_path, f"http://localhost:{port}/b.png")
    assert one["size"] == two["size"] == len(PNG)
    for url in ("http://10.0.0.1/a.png", "http://169.254.169.254/latest/", "http://[fd00::1]/a.png"):
        with pytest.raises(OutputDownloadError, match="Refusing to download"):
            persist(tmp_path, url)


def test_a_bad_allow_list_fails_before_any_request(monkeypatch, file_host, tmp_path):
    set_connection(monkeypatch, "http://127.0.0.1:9", allowed_output_hosts="mirror.corp.example, https://cdn.example/")
    with pytest.raises(CometAPIConfigError, match=r"'allowed_output_hosts' entry 'https://cdn.example/' is neither"):
        persist(tmp_path, f"{file_host.url}/a.png")
    assert file_host.seen == []


def test_the_allow_list_is_not_sent_to_cometapi_as_a_header(scripted, monkeypatch):
    set_connection(monkeypatch, scripted.url, allowed_output_hosts=["mirror.corp.example"])
    scripted.script(Answer(body={"id": "p1", "status": "starting"}))
    CometAPIHook().get_prediction("p1")
    assert not any("allowed_output_hosts" in k.lower() for k in scripted.seen[0].headers)


# -- through a proxy -----------------------------------------------------------------------------------------


def _through_proxy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url_of: Any) -> tuple[Any, list[bytes]]:
    """Persist ``url_of(file host port)`` with ``HTTP_PROXY`` set to a real proxy on 127.0.0.1; the outcome
    (records or the error) and what the proxy was sent."""
    # The proxy serves from a loop in a thread of its own: Airflow 2 runs an operator's execute only in the
    # thread that built it.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    proxy = asyncio.run_coroutine_threadsafe(HttpProxy().__aenter__(), loop).result()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "")
    try:
        with ScriptedServer() as host:
            host.script(Answer(status=200, body=PNG, content_type="image/png"))
            try:
                outcome: Any = persist(tmp_path, url_of(host.url.rsplit(":", 1)[1]))
            except OutputDownloadError as e:
                outcome = e
    finally:
        asyncio.run_coroutine_threadsafe(proxy.__aexit__(None, None, None), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    return outcome, [bytes(s) for s in proxy.seen]


def test_through_a_proxy_a_name_the_worker_cannot_resolve_is_left_to_the_proxy(
    monkeypatch, public_api, resolver, tmp_path
):
    # The worker's resolver knows no outside names (often so behind a proxy); the proxy's does.
    resolver.names["cdn.proxied.example"] = [socket.gaierror(socket.EAI_NONAME, "unknown"), ["127.0.0.1"]]
    outcome, seen = _through_proxy(monkeypatch, tmp_path, lambda port: f"http://cdn.proxied.example:{port}/a.png")
    assert isinstance(outcome, list) and outcome[0]["size"] == len(PNG), outcome
    assert any(b"GET http://cdn.proxied.example:" in s for s in seen)


@pytest.mark.parametrize(
    ("url", "names", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", {}, "the cloud metadata service"),
        ("http://0xa9fea9fe/latest/meta-data/", {}, "the cloud metadata service"),
        ("http://internal.corp.example/a.png", {"internal.corp.example": [["10.9.8.7"]]}, "a private address"),
    ],
)
def test_through_a_proxy_what_the_worker_can_see_is_still_checked(
    monkeypatch, public_api, resolver, tmp_path, url, names, reason
):
    resolver.names.update(names)
    outcome, seen = _through_proxy(monkeypatch, tmp_path, lambda port: url)
    assert isinstance(outcome, OutputDownloadError) and reason in str(outcome)
    assert seen == []  # the proxy was not even asked


# -- the pieces --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("8.8.8.8", False),
        ("93.184.215.14", False),
        ("2606:4700::1111", False),
        ("::ffff:8.8.8.8", False),
        ("64:ff9b::808:808", False),  # DNS64 on an IPv6-only network
        ("2002:808:808::1", False),
        ("198.18.0.1", True),  # benchmarking
        ("192.0.2.1", True),  # documentation
        ("255.255.255.255", True),
        ("2001:db8::1", True),
        ("fe80::1%eth0", True),
    ],
)
def test_public_addresses_pass_and_special_ones_do_not(address, refused):
    assert (AddressPolicy().refusal("h.example", address) is not None) is refused


def test_a_cidr_allow_entry_covers_the_ipv4_mapped_form():
    policy = AddressPolicy(allowed_hosts=parse_allowed_hosts("10.1.0.0/16"))
    assert policy.refusal("m.example", "::ffff:10.1.2.3") is None
    assert policy.refusal("m.example", "10.2.0.1") is not None


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        (None, ()),
        ("", ()),
        (" mirror.corp.example , 10.1.0.0/16,", ("mirror.corp.example", "10.1.0.0/16")),
        ('["*.Corp.Example", "10.1.2.3", "[fd12::1]"]', ("*.corp.example", "10.1.2.3/32", "fd12::1/128")),
        (["a.example", "a.example", "10.1.2.0/8"], ("a.example", "10.0.0.0/8")),
    ],
)
def test_allow_list_forms(raw, parsed):
    assert parse_allowed_hosts(raw) == parsed


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("https://mirror.example/", "neither a host name"),
        ("mirror.example:8080", "neither a host name"),
        ("10.0.0.0/33", "neither a host name"),
        ("[not json", "not a valid JSON list"),
        (42, "comma-separated string or a list"),
        ([1], "entries must be strings"),
    ],
)
def test_a_bad_allow_list_names_the_problem(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_allowed_hosts(raw)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("api.localhost", True), ("::1", True), ("2130706433", True),
     ("api.cometapi.com", False), ("10.0.0.1", False), ("localhost.example", False), (None, False)],
)
def test_which_api_hosts_count_as_loopback(host, loopback):
    assert is_loopback_host(host) is loopback
