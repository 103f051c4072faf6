"""A throw-away PostgreSQL cluster on 127.0.0.1 for the reliability tests.

Airflow needs row locks (``SELECT ... FOR UPDATE SKIP LOCKED``) to share triggers between several
triggerers, which SQLite cannot give; so the tests that need several triggerers run on a real PostgreSQL
server started here from Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``).

:class:`PostgresCluster` runs ``initdb`` in a temporary directory, starts ``postgres`` listening on
127.0.0.1 only (a free port, no Unix socket), creates a database, and at :meth:`stop` stops the server and
deletes the directory. The server refuses to run as root, so when the tests run as root the cluster
belongs to an unprivileged user (``postgres``, which the Debian package creates; created here if absent)
and ``initdb`` and ``postgres`` are started as that user (``subprocess``'s ``user=``/``group=``). The
server is this process's child (not daemonised by ``pg_ctl``), so stopping it leaves no orphan behind.

    with PostgresCluster() as pg:
        url = pg.url  # postgresql+psycopg2://airflow:<password>@127.0.0.1:<port>/airflow

Tuned for speed, not durability (``fsync=off``): the data is thrown away anyway.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.e2e.deployment import free_port
from tests.e2e.lifecycle import StartStopContext

__all__ = ["PostgresCluster", "PostgresUnavailable", "find_postgres_bin", "unavailable_reason"]

#: Debian/Ubuntu layout; ``AIRFLOW_COMET_PG_BIN`` overrides (a directory holding initdb, postgres, pg_dump).
_BIN_GLOB = "/usr/lib/postgresql/*/bin"
_SERVICE_USER = "postgres"
_INSTALL_HINT = "install Debian's postgresql package (apt-get install -y postgresql), as .ci/run does"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started on this machine (the message says why and how to fix it)."""


def find_postgres_bin() -> Path | None:
    """The directory with ``initdb`` and ``postgres`` (newest installed version), or ``None``."""
    override = os.environ.get("AIRFLOW_COMET_PG_BIN")
    candidates = [override] if override else []
    candidates += sorted(glob.glob(_BIN_GLOB), key=_version_key, reverse=True)
    for folder in candidates:
        path = Path(folder)
        if all((path / name).is_file() for name in ("initdb", "postgres")):
            return path
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).parent
    return None


def _version_key(folder: str) -> tuple[int, ...]:
    digits = Path(folder).parent.name
    try:
        return tuple(int(p) for p in digits.split("."))
    except ValueError:
        return (0,)


def unavailable_reason() -> str | None:
    """Why no cluster can be started here (``None``: it can)."""
    if find_postgres_bin() is None:
        return f"PostgreSQL server binaries (initdb, postgres) not found under {_BIN_GLOB} or on PATH: {_INSTALL_HINT}"
    return None


class PostgresCluster(StartStopContext):
    """One PostgreSQL server with one database, on 127.0.0.1, for the life of the object."""

    def __init__(self, *, database: str = "airflow", user: str = "airflow", max_connections: int = 400) -> None:
        bin_dir = find_postgres_bin()
        if bin_dir is None:
            raise PostgresUnavailable(unavailable_reason() or "PostgreSQL not found")
        self.bin_dir = bin_dir
        self.database = database
        self.user = user
        self.password = secrets.token_hex(16)
        self.max_connections = max_connections
        self.port = free_port()
        self.host = "127.0.0.1"
        self.root: Path | None = None
        self._os_user: str | None = None  # who owns and runs the cluster (None: this process's user)
        self._started = False
        self._proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.timings: dict[str, float] = {}

    # -- URLs ----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg2) for Airflow's ``[database] sql_alchemy_conn``."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        t0 = time.monotonic()
        atexit.register(self.stop)
        self._os_user = self._service_user() if os.geteuid() == 0 else None
        # Under /tmp, not pytest's tmp dir: that one is 0700 and the service user could not enter it.
        self.root = Path(tempfile.mkdtemp(prefix="airflow-comet-pg-"))
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._os_user:
            entry = pwd.getpwnam(self._os_user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        os.chmod(pwfile, 0o600)
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout=120,
        )
        pwfile.unlink()
        self.timings["initdb"] = time.monotonic() - t0
        settings = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": "",  # TCP on 127.0.0.1 only
            "max_connections": self.max_connections,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
        }
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        self.log_path = self.root / "server.log"
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
                env=self._env(),
                **self._as_user(),
            )
        self._started = True
        self._wait_ready(deadline=time.monotonic() + 60)
        self._create_database()
        self.timings["ready"] = time.monotonic() - t0

    def stop(self) -> None:
        """Stop the server (fast shutdown, then SIGKILL) and delete its directory. Idempotent."""
        atexit.unregister(self.stop)
        pids = [(pid, _start_time(pid)) for pid in self.server_pids()]
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # "fast" shutdown: roll back open transactions, exit
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            for pid, started in pids:  # whatever is left of the postmaster and its children
                if _start_time(pid) != started:
                    continue  # gone (its pid may already belong to someone else's process)
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._started = False
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def server_pids(self) -> list[int]:
        """The postmaster and its children (which call ``setsid``, so a process group does not hold them)."""
        if self._proc is None or self._proc.poll() is not None:
            return []
        return [self._proc.pid, *_children(self._proc.pid)]

    # -- helpers --------------------------------------------------------------------------------------

    def psql_url(self) -> str:
        """A libpq URL (for ``psql``/``pg_dump``), without the SQLAlchemy driver."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def dump(self) -> str:
        """``pg_dump`` of the database as SQL text (to search the whole metadata DB for a string)."""
        proc = subprocess.run(
            [str(self.bin_dir / "pg_dump"), "--no-owner", "--data-only", self.psql_url()],
            env={**os.environ, "PGPASSWORD": self.password},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"pg_dump exited {proc.returncode}: {proc.stderr[-2000:]}")
        return proc.stdout

    def _service_user(self) -> str:
        try:
            pwd.getpwnam(_SERVICE_USER)
        except KeyError:
            # The Debian package creates it; a bare image may not have it.
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _SERVICE_USER],
                check=True,
                capture_output=True,
                timeout=30,
            )
        return _SERVICE_USER

    def _as_user(self) -> dict:
        if not self._os_user:
            return {}
        entry = pwd.getpwnam(self._os_user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if self.root is not None:
            env["HOME"] = str(self.root)
        return env

    def _run(self, argv: list[str], *, timeout: float) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            argv,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root or "/",
            check=False,
            **self._as_user(),
        )
        if proc.returncode != 0:
            raise PostgresUnavailable(
                f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )
        return proc

    def _connect(self):
        import psycopg2

        return psycopg2.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname="postgres", connect_timeout=5
        )

    def _wait_ready(self, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._connect().close()
                return
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                last = exc
                time.sleep(0.2)
            if self._proc is not None and self._proc.poll() is not None:
                break
        log = self.log_path.read_text(errors="replace")[-3000:] if self.log_path and self.log_path.exists() else ""
        raise PostgresUnavailable(
            f"PostgreSQL on {self.host}:{self.port} did not accept connections ({last!r}); server log:\n{log}"
        )

    def _create_database(self) -> None:
        conn = self._connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.database}" OWNER "{self.user}"')
        finally:
            conn.close()


def _children(ppid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
                found.append(int(entry))
    return found


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (identifies it across pid reuse)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
