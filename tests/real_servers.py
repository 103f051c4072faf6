"""Debian's squid and nginx on 127.0.0.1, for testing the transports against HTTP software we did not write.

- :class:`Squid`: a forward proxy asking for Basic credentials, tunnelling ``CONNECT`` to any port.
- :class:`Nginx`: a TLS-terminating reverse proxy (certificate of a private CA) in front of a plain-HTTP
  upstream, closing idle keep-alive connections after ``keepalive`` seconds, as busy front ends do.

Each runs in the foreground in a throw-away directory of its own (world-readable: run as root, squid's and
nginx's workers drop to their unprivileged users) and is stopped when the ``with`` block ends. .ci/run
installs both packages; elsewhere :func:`missing` names what is absent so the tests can skip.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SQUID = shutil.which("squid") or "/usr/sbin/squid"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
BASIC_AUTH_HELPER = "/usr/lib/squid/basic_ncsa_auth"


def missing() -> str | None:
    """Why these servers cannot run here (a binary not installed), or ``None``."""
    for path, package in ((SQUID, "squid"), (BASIC_AUTH_HELPER, "squid"), (NGINX, "nginx-light")):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (apt-get install {package})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}: {_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{process.args[0]} did not listen on 127.0.0.1:{port} within {timeout:g} s: {_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


class _Server:
    """A directory of its own, a process, and its stop."""

    name = ""

    def __enter__(self):  # type: ignore[no-untyped-def]
        self.dir = Path(tempfile.mkdtemp(prefix=f"airflow-comet-{self.name}-"))
        self.dir.chmod(0o755)  # its workers run as another user when started by root
        self.port = _free_port()
        self.process = self._start()
        try:
            _wait_listening(self.port, self.process, self.log)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _start(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _owned_by(self, user: str) -> None:
        """Let ``user`` (the one the server's workers run as, when started by root) write the directory."""
        if os.geteuid() == 0:
            entry = pwd.getpwnam(user)
            for path in [self.dir, *self.dir.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid)


class Squid(_Server):
    """``with Squid(user, password) as squid``: ``squid.url_with(user, password)`` is the proxy URL."""

    name = "squid"

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password

    def url_with(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / "cache.log"

    def _start(self) -> subprocess.Popen[bytes]:
        hashed = subprocess.run(
            ["openssl", "passwd", "-apr1", self.password], check=True, capture_output=True, text=True
        ).stdout.strip()
        (self.dir / "passwd").write_text(f"{self.user}:{hashed}\n")
        conf = self.dir / "squid.conf"
        conf.write_text(
            f"""
http_port 127.0.0.1:{self.port}
pid_filename {self.dir}/squid.pid
cache_log {self.log}
access_log {self.dir}/access.log
cache_store_log none
coredump_dir {self.dir}
cache deny all
auth_param basic program {BASIC_AUTH_HELPER} {self.dir}/passwd
auth_param basic realm airflow-comet tests
acl authenticated proxy_auth REQUIRED
http_access allow authenticated
http_access deny all
shutdown_lifetime 0 seconds
"""
        )
        self._owned_by("proxy")
        return subprocess.Popen(
            [SQUID, "-N", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir
        )


class Nginx(_Server):
    """``with Nginx(upstream_port, cert, key, keepalive=1) as nginx``: ``nginx.url`` is ``https://...``."""

    name = "nginx"

    def __init__(self, upstream_port: int, cert: Path, key: Path, *, keepalive: float = 1.0) -> None:
        self.upstream_port, self.cert, self.key, self.keepalive = upstream_port, cert, key, keepalive

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / "error.log"

    def requests(self) -> list[tuple[str, str]]:
        """``(connection serial number, request line)`` of each request so far (nginx writes a line per request
        once it has answered it)."""
        lines = (self.dir / "access.log").read_text().splitlines()
        return [tuple(line.split(" ", 1)) for line in lines if line]  # type: ignore[misc]

    def _start(self) -> subprocess.Popen[bytes]:
        temp = self.dir / "temp"
        temp.mkdir()
        temp.chmod(0o777)
        conf = self.dir / "nginx.conf"
        conf.write_text(
            f"""
daemon off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.log} info;
events {{ worker_connections 256; }}
http {{
    log_format connections '$connection $request';
    access_log {self.dir}/access.log connections;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        keepalive_timeout {int(self.keepalive * 1000)}ms;
        location / {{
            proxy_pass http://127.0.0.1:{self.upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
        )
        return subprocess.Popen(
            [NGINX, "-p", str(self.dir), "-c", str(conf), "-e", str(self.log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
