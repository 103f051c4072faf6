"""A real Airflow deployment on this machine (3.3; 2.11 too), for end-to-end tests.

:class:`AirflowDeployment` creates a throw-away ``AIRFLOW_HOME``, configures Airflow only through
``AIRFLOW__...`` environment variables, starts the CometAPI simulator as its own process, runs
``airflow db migrate`` and then starts ``airflow api-server``, ``airflow scheduler``,
``airflow dag-processor`` and N ``airflow triggerer`` processes, each in its own session (process
group) with its output in ``<home>/component-logs/<name>.log``. On Airflow 2.11 it starts
``airflow webserver`` (``/api/v1``, anonymous = Admin) instead of the api-server, and on SQLite the
scheduler parses DAGs and runs tasks with the SequentialExecutor (the only executor 2.x allows there).

Every wait has a deadline; when one passes, or a component dies, :class:`DeploymentError` (an
``AssertionError``) is raised with the tail of every component's log in its message.

Teardown stops each process group (SIGTERM, then SIGKILL after ``stop_grace`` seconds) and then sweeps
every process that still carries this deployment's marker environment variable: Airflow's task
supervisor puts each task process in a process group of its own, so ``killpg`` on the scheduler's group
does not reach them.

    config = DeploymentConfig(triggerers=2, simulator_faults={"durations": 8})
    with AirflowDeployment(config, base_dir=tmp_path) as dep:
        dep.wait_for_dag("comet_create_and_sense")
        dep.api.unpause("comet_create_and_sense")
        run_id = dep.api.trigger("comet_create_and_sense", conf={"prompt": "a boat"})
        with dep.api.watch("comet_create_and_sense", run_id) as watcher:
            run = dep.wait_for_run("comet_create_and_sense", run_id, timeout=120)
        assert "deferred" in watcher.states_of("wait")
        dep.simulator.requests(endpoint="create"); dep.simulator.set_faults(fail_rate=1.0)
        dep.stop_component("triggerer-0"); dep.add_triggerer()  # for reliability tests
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from tests.e2e.lifecycle import StartStopContext

__all__ = [
    "API_KEY",
    "AirflowAPI",
    "AirflowDeployment",
    "Component",
    "DeploymentConfig",
    "DeploymentError",
    "SimulatorClient",
    "StateWatcher",
    "airflow_version",
    "free_port",
    "unsupported_reason",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGS_EXAMPLES = REPO_ROOT / "dags_examples"

#: A distinctive key: tests assert it never shows up in logs or XComs.
API_KEY = "sk-e2e-SECRET-7f3c9a1d5b2e4f60"

#: Every process the harness starts (and all their descendants) inherit this variable; teardown kills any
#: process still carrying this deployment's value.
MARKER_ENV = "AIRFLOW_COMET_E2E_DEPLOYMENT"

TERMINAL_RUN_STATES = frozenset({"success", "failed"})
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


def airflow_version(python: str | None = None) -> tuple[int, ...]:
    """The Airflow version installed for ``python`` (this interpreter by default), as a tuple of ints."""
    if python is None or Path(python).resolve() == Path(sys.executable).resolve():
        from importlib.metadata import version

        text = version("apache-airflow")
    else:
        text = subprocess.run(
            [python, "-c", "from importlib.metadata import version; print(version('apache-airflow'))"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def unsupported_reason(version: tuple[int, ...]) -> str | None:
    """Why the harness cannot drive this Airflow version (``None``: it can).

    Verified: Airflow 3.3 (api-server, dag-processor, ``/api/v2``) and Airflow 2.11 (webserver, ``/api/v1``,
    SequentialExecutor on SQLite). Airflow 3.0-3.2 and 2.10 or older are untested."""
    text = ".".join(map(str, version))
    if version >= (3, 3) or (2, 11) <= version < (3,):
        return None
    return f"the e2e harness supports Airflow 2.11 and >= 3.3; this venv has Airflow {text}"


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DeploymentError(AssertionError):
    """A wait ran out of time or a component died; the message carries the components' log tails."""


# --------------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------------


@dataclass
class DeploymentConfig:
    """What to bring up. Every field has a default that suits a quick single-machine test."""

    #: Number of ``airflow triggerer`` processes.
    triggerers: int = 1
    #: Number of ``airflow scheduler`` processes (more than one needs a database with row locks).
    schedulers: int = 1
    #: Start ``airflow dag-processor`` (Airflow 2: with ``[scheduler] standalone_dag_processor``; if False
    #: there, the scheduler parses).
    dag_processor: bool = True
    #: ``None``: LocalExecutor (Airflow 2 on SQLite: SequentialExecutor, the only one it allows there).
    executor: str | None = None
    #: ``[core] parallelism``: LocalExecutor pre-forks this many workers.
    parallelism: int = 4
    #: SQLAlchemy URL of the metadata DB; ``None`` = a SQLite file in the temporary home.
    database_url: str | None = None
    #: Run ``airflow db reset --yes`` before ``db migrate`` (for a shared server database).
    reset_database: bool = False
    dags_folder: Path = DAGS_EXAMPLES
    #: The CometAPI key the simulator demands and the connection carries.
    api_key: str = API_KEY
    #: Extra fields of the ``cometapi_default`` connection (fast retries by default).
    connection_extra: Mapping[str, Any] = field(
        default_factory=lambda: {"retry_backoff": 0.2, "max_retries": 4, "read_timeout": 15, "connect_timeout": 5}
    )
    #: Start the simulator process and point ``cometapi_default`` at it.
    simulator: bool = True
    #: ``Faults`` fields for the simulator at start (``{"durations": 8}`` = every prediction runs 8 s).
    simulator_faults: Mapping[str, Any] = field(default_factory=dict)
    simulator_seed: int = 0
    #: ``{"section": {"key": value}}`` written as ``AIRFLOW__SECTION__KEY`` on top of the defaults.
    airflow_config: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Raw environment variables added last (win over everything else).
    extra_env: Mapping[str, str] = field(default_factory=dict)
    #: ``"all_admins"``: no login (simple auth manager, everyone admin). ``"password"``: user ``admin``
    #: with :attr:`admin_password`, the REST client gets a JWT from ``POST /auth/token``.
    auth: str = "all_admins"
    admin_password: str = "e2e-admin-password"
    #: The Python that runs Airflow (``-m airflow``) and the simulator; default: this interpreter.
    python: str = sys.executable
    #: Seconds allowed for the whole start-up (migrate included) and for ``db migrate`` alone.
    start_timeout: float = 150.0
    migrate_timeout: float = 120.0
    #: Seconds between SIGTERM and SIGKILL at stop.
    stop_grace: float = 6.0
    #: Bytecode cache for the deployment's processes (``PYTHONPYCACHEPREFIX``), kept between runs so that
    #: each Airflow process does not compile Airflow from source again (this machine sets
    #: ``PYTHONDONTWRITEBYTECODE=1`` and the venvs hold no ``.pyc``). ``None``: leave the environment alone.
    pycache_prefix: Path | None = field(
        default_factory=lambda: Path(tempfile.gettempdir()) / f"airflow-comet-e2e-pycache-{os.getuid()}"
    )
    #: Lines of each log shown in a failure message.
    tail_lines: int = 40
    #: Keep the home directory after stop (it is always kept when created under a pytest tmp dir).
    keep_home: bool = True

    def __post_init__(self) -> None:
        if self.triggerers < 0 or self.schedulers < 0:
            raise ValueError("triggerers and schedulers must be >= 0")
        if self.auth not in ("all_admins", "password"):
            raise ValueError("auth must be 'all_admins' or 'password'")
        self.dags_folder = Path(self.dags_folder)


# --------------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------------


@dataclass
class Component:
    """One process the harness started, in its own session; ``log_path`` holds its stdout+stderr."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    #: Stopped on purpose (a dead process is then not an error).
    stopped: bool = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def tail(self, lines: int = 40) -> str:
        return tail_file(self.log_path, lines)

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the component's whole process group."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signum)  # start_new_session: pgid == pid
        except (ProcessLookupError, PermissionError):
            pass


def tail_file(path: Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _group_wait(components: Sequence[Component], deadline: float) -> None:
    for comp in components:
        if comp.proc is None:
            continue
        try:
            comp.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _group_has_members(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _processes_with_marker(marker: str) -> list[int]:
    """PIDs of this user's processes whose environment carries ``MARKER_ENV=marker`` (from /proc)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


# --------------------------------------------------------------------------------------------------------
# REST clients
# --------------------------------------------------------------------------------------------------------


class SimulatorClient:
    """The simulator's admin endpoints (``/_simulator/...``) over HTTP."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._session = requests.Session()
        self._session.trust_env = False  # never through a proxy

    def _admin(self, method: str, name: str, **kwargs: Any) -> Any:
        response = self._session.request(method, f"{self.base_url}/_simulator/{name}", timeout=10, **kwargs)
        response.raise_for_status()
        return response.json()

    def requests(self, **filters: str) -> list[dict[str, Any]]:
        """The request log (filters: ``server``, ``endpoint``, ``prediction_id``, ``method``)."""
        return self._admin("GET", "requests", params=filters)["requests"]

    def predictions(self) -> list[dict[str, Any]]:
        return self._admin("GET", "predictions")["predictions"]

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "stats")

    def faults(self) -> dict[str, Any]:
        return self._admin("GET", "faults")["faults"]

    def set_faults(self, **fields: Any) -> dict[str, Any]:
        """Replace the faults (``Faults`` fields; everything not given goes back to healthy)."""
        return self._admin("POST", "faults", json=fields)["faults"]

    def reset(self) -> None:
        """Forget predictions and requests; restore the start-up faults."""
        self._admin("POST", "reset")

    def connection(self, api_key: str | None = None, **extra: Any) -> dict[str, Any]:
        """A ``cometapi`` connection (as the JSON of an ``AIRFLOW_CONN_...`` variable) to this simulator."""
        return {"conn_type": "cometapi", "password": api_key or self.api_key, "host": self.base_url, "extra": extra}


class AirflowAPI:
    """A small client for Airflow's public REST API: ``/api/v2`` (Airflow 3) or ``/api/v1`` (Airflow 2)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_version: int = 2,
        token_provider: Callable[[requests.Session], str | None] | None = None,
        diagnostics: Callable[[], str] = lambda: "",
        check_alive: Callable[[], None] = lambda: None,
        timeout: float = 15.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_version = api_version
        self._token_provider = token_provider
        self._diagnostics = diagnostics
        self._check_alive = check_alive
        self.timeout = timeout
        self._local = threading.local()

    # -- plumbing -----------------------------------------------------------------------------------------

    @property
    def session(self) -> requests.Session:
        """One session per thread (the state watcher polls from its own thread)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False
            if self._token_provider is not None:
                token = self._token_provider(session)
                if token:
                    session.headers["Authorization"] = f"Bearer {token}"
            self._local.session = session
        return session

    def request(self, method: str, path: str, *, expect: Sequence[int] = (200,), **kwargs: Any) -> requests.Response:
        """``method`` on ``/api/v<n>/<path>``; raise :class:`DeploymentError` unless the status is in ``expect``."""
        url = path if path.startswith("http") else f"{self.base_url}/api/v{self.api_version}/{path.lstrip('/')}"
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.session.request(method, url, **kwargs)
        except requests.ConnectionError:
            self._check_alive()  # a dead api-server: say so, with its log
            raise
        if response.status_code not in expect:
            raise DeploymentError(
                f"{method} {url} answered {response.status_code}: {response.text[:2000]}\n{self._diagnostics()}"
            )
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    # -- dags and runs -----------------------------------------------------------------------------------

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        response = self.request("GET", f"dags/{quote(dag_id)}", expect=(200, 404))
        return response.json() if response.status_code == 200 else None

    def import_errors(self) -> list[dict[str, Any]]:
        return self.get("importErrors")["import_errors"]

    def unpause(self, dag_id: str) -> dict[str, Any]:
        return self.request("PATCH", f"dags/{quote(dag_id)}", json={"is_paused": False}).json()

    def pause(self, dag_id: str) -> dict[str, Any]:
        return self.request("PATCH", f"dags/{quote(dag_id)}", json={"is_paused": True}).json()

    def trigger(
        self, dag_id: str, *, conf: Mapping[str, Any] | None = None, run_id: str | None = None, **body: Any
    ) -> str:
        """Trigger a manual run (``logical_date`` null on Airflow 3); returns its run id."""
        payload: dict[str, Any] = {"conf": dict(conf or {}), **body}
        if self.api_version >= 2:
            payload.setdefault("logical_date", None)
        if run_id is not None:
            payload["dag_run_id"] = run_id
        response = self.request("POST", f"dags/{quote(dag_id)}/dagRuns", json=payload)
        return response.json()["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.get(f"dags/{quote(dag_id)}/dagRuns/{quote(run_id)}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        data = self.get(f"dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances", params={"limit": 100})
        return data["task_instances"]

    def task_instance(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
        path = f"dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}"
        if map_index >= 0:
            path += f"/{map_index}"
        return self.get(path)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        """The XCom value as stored (JSON-decoded when the API hands back the serialized text; on Airflow 2
        the API answers ``str(value)``, parsed back with ``ast.literal_eval``)."""
        path = f"dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}/xcomEntries/{quote(key)}"
        params: dict[str, Any] = {"map_index": map_index}
        if self.api_version < 2:
            params["deserialize"] = "true"  # needs [api] enable_xcom_deserialize_support
        value = self.get(path, params=params)["value"]
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                pass
            if self.api_version < 2:
                import ast

                try:
                    return ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    pass
        return value

    def jobs(self, job_type: str | None = None, *, alive: bool | None = None) -> list[dict[str, Any]]:
        """Scheduler/triggerer/dag-processor jobs (``job_type`` e.g. ``TriggererJob``); Airflow 3 only."""
        if self.api_version < 2:
            raise NotImplementedError("Airflow 2's REST API has no jobs endpoint")
        params: dict[str, Any] = {"limit": 100}
        if job_type:
            params["job_type"] = job_type
        if alive is not None:
            params["is_alive"] = str(alive).lower()
        return self.get("jobs", params=params)["jobs"]

    def health(self) -> dict[str, Any]:
        return self.get("monitor/health" if self.api_version >= 2 else "health")

    @contextmanager
    def watch(self, dag_id: str, run_id: str, interval: float = 0.3) -> Iterator[StateWatcher]:
        """Record every state the run's task instances are seen in while the block runs."""
        watcher = StateWatcher(self, dag_id, run_id, interval)
        watcher.start()
        try:
            yield watcher
        finally:
            watcher.stop()


class StateWatcher:
    """Polls a run's task instances from a thread; keeps each one's distinct states in the order seen."""

    def __init__(self, api: AirflowAPI, dag_id: str, run_id: str, interval: float = 0.3) -> None:
        self.api = api
        self.dag_id = dag_id
        self.run_id = run_id
        self.interval = interval
        #: ``(task_id, map_index) -> [(state, try_number, monotonic time first seen), ...]``
        self.history: dict[tuple[str, int], list[tuple[str | None, int, float]]] = {}
        self.polls = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{run_id}", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll_once()  # the final states, however quick the end was

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval)

    def poll_once(self) -> None:
        try:
            tis = self.api.task_instances(self.dag_id, self.run_id)
        except Exception as exc:  # noqa: BLE001 - keep watching; a blip must not end the record
            self.errors.append(repr(exc)[:300])
            return
        now = time.monotonic()
        with self._lock:
            self.polls += 1
            for ti in tis:
                key = (ti["task_id"], int(ti.get("map_index", -1)))
                seen = self.history.setdefault(key, [])
                entry = (ti.get("state"), int(ti.get("try_number") or 0))
                if not seen or seen[-1][:2] != entry:
                    seen.append((*entry, now))

    def states_of(self, task_id: str, map_index: int = -1) -> list[str | None]:
        """The distinct states ``task_id`` was seen in, in order (consecutive repeats collapsed)."""
        with self._lock:
            out: list[str | None] = []
            for state, _try, _t in self.history.get((task_id, map_index), []):
                if not out or out[-1] != state:
                    out.append(state)
            return out

    def try_numbers_of(self, task_id: str, map_index: int = -1) -> list[int]:
        with self._lock:
            return sorted({t for _s, t, _when in self.history.get((task_id, map_index), [])})

    def summary(self) -> str:
        with self._lock:
            lines = [f"{self.polls} polls, {len(self.errors)} errors"]
            for (task_id, map_index), seen in sorted(self.history.items()):
                label = task_id if map_index < 0 else f"{task_id}[{map_index}]"
                lines.append(f"  {label}: " + " -> ".join(f"{s}(try {t})" for s, t, _ in seen))
            return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# the deployment
# --------------------------------------------------------------------------------------------------------


class AirflowDeployment(StartStopContext):
    """A running Airflow deployment plus a CometAPI simulator; use as a context manager."""

    def __init__(self, config: DeploymentConfig | None = None, *, base_dir: Path | str | None = None) -> None:
        self.config = config or DeploymentConfig()
        self.marker = uuid.uuid4().hex
        self._created_home = base_dir is None
        self.home = Path(base_dir) if base_dir is not None else Path(_mkdtemp())
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs_dir = self.home / "logs"  # [logging] base_log_folder: task and trigger logs
        self.component_logs = self.home / "component-logs"
        self.component_logs.mkdir(exist_ok=True)
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        #: The Airflow version the deployment runs; Airflow 2 gets a webserver and ``/api/v1`` instead.
        self.version = airflow_version(self.config.python)
        self.airflow3 = self.version >= (3,)
        #: Airflow 2 refuses a standalone dag-processor on SQLite: its scheduler parses there.
        self.dag_processor = self.config.dag_processor and (
            self.airflow3 or (self.config.database_url or "sqlite").split(":")[0] != "sqlite"
        )
        if not self.airflow3 and self.config.auth != "all_admins":
            raise ValueError("auth='password' needs Airflow 3 (the simple auth manager)")
        self.components: dict[str, Component] = {}
        self.simulator: SimulatorClient | None = None
        self.env: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        #: PIDs the final sweep had to kill (outside every component's process group, e.g. task processes).
        self.swept: list[int] = []
        self._started = False
        self.api = AirflowAPI(
            self.api_url,
            api_version=2 if self.airflow3 else 1,
            token_provider=self._token if self.config.auth == "password" else None,
            diagnostics=self.diagnostics,
            check_alive=self.check_alive,
        )

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Simulator, ``db migrate``, then every component; returns once the deployment answers and is warm."""
        t0 = time.monotonic()
        deadline = t0 + self.config.start_timeout
        atexit.register(self.stop)  # a crashed or interrupted session must not leave processes behind
        if self.config.simulator:
            self._start_simulator()  # starts while the database is migrated
        self.env = self._build_env()
        self._migrate()
        self.timings["migrate_done"] = time.monotonic() - t0
        if self.config.simulator:
            self._wait_for_simulator()

        cfg = self.config
        if self.airflow3:
            self._start_component("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(self.api_port)])
        else:
            self._start_component(
                "webserver", ["webserver", "--hostname", "127.0.0.1", "--port", str(self.api_port), "--workers", "1"]
            )
        for i in range(cfg.schedulers):
            self._start_component(f"scheduler-{i}", ["scheduler", "--skip-serve-logs"])
        if self.dag_processor:
            self._start_component("dag-processor", ["dag-processor"])
        for i in range(cfg.triggerers):
            self.add_triggerer(i)
        self._started = True

        self.wait_for_api(deadline)
        self.timings["api_up"] = time.monotonic() - t0
        self._warm_up(deadline)
        self.wait_for_jobs(deadline)
        self.timings["ready"] = time.monotonic() - t0

    def stop(self) -> None:
        """Stop every component's process group (SIGTERM, SIGKILL after ``stop_grace``), then sweep strays."""
        comps = [c for c in self._stop_order() if c.proc is not None]
        for comp in comps:
            comp.signal_group(signal.SIGTERM)
        _group_wait(comps, time.monotonic() + self.config.stop_grace)
        for comp in comps:
            if comp.alive or _group_has_members(comp.proc.pid):
                comp.signal_group(signal.SIGKILL)
        _group_wait(comps, time.monotonic() + 5)
        self._sweep()
        for comp in comps:
            comp.stopped = True
        self._started = False
        atexit.unregister(self.stop)
        if not self.config.keep_home and self._created_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def _stop_order(self) -> list[Component]:
        def rank(comp: Component) -> int:
            order = ("scheduler", "triggerer", "dag-processor", "api-server", "webserver", "simulator")
            return next((i for i, prefix in enumerate(order) if comp.name.startswith(prefix)), len(order))

        return sorted(self.components.values(), key=rank)

    def _sweep(self) -> None:
        """SIGKILL whatever still carries the marker (task processes live in process groups of their own)."""
        for _ in range(3):
            pids = _processes_with_marker(self.marker)
            if not pids:
                return
            self.swept.extend(pids)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.3)

    def leftover_pids(self) -> list[int]:
        """Processes still carrying this deployment's marker (should be empty after :meth:`stop`)."""
        return _processes_with_marker(self.marker)

    # -- environment ------------------------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k not in _PROXY_VARS}
        env.update(
            {
                MARKER_ENV: self.marker,
                "AIRFLOW_HOME": str(self.home),
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
                "PYTHONUNBUFFERED": "1",
                # Executors that run ``airflow tasks run`` find this venv's ``airflow`` first.
                "PATH": os.pathsep.join([str(Path(self.config.python).parent), os.environ.get("PATH", "")]),
            }
        )
        if self.config.pycache_prefix is not None:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(self.config.pycache_prefix)
        return env

    def airflow_settings(self) -> dict[str, dict[str, Any]]:
        """``{section: {key: value}}`` the deployment runs with (before :attr:`DeploymentConfig.airflow_config`)."""
        cfg = self.config
        db_url = cfg.database_url or f"sqlite:///{self.home / 'airflow.db'}"
        if not self.airflow3:
            return self._airflow2_settings(db_url)
        settings: dict[str, dict[str, Any]] = {
            "core": {
                "dags_folder": cfg.dags_folder,
                "load_examples": False,
                "executor": cfg.executor or "LocalExecutor",
                "parallelism": cfg.parallelism,
                "execution_api_server_url": f"{self.api_url}/execution/",
                "fernet_key": _fernet_key(),
                "auth_manager": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
                "simple_auth_manager_all_admins": cfg.auth == "all_admins",
                "simple_auth_manager_users": "admin:admin",
                "simple_auth_manager_passwords_file": self.home / "simple_auth_manager_passwords.json",
                "dags_are_paused_at_creation": True,
                "min_serialized_dag_update_interval": 5,
                "dagbag_import_timeout": 60,
            },
            "database": {"sql_alchemy_conn": db_url},
            "api": {
                "host": "127.0.0.1",
                "port": self.api_port,
                "workers": 1,
                "secret_key": secrets.token_hex(16),
                "expose_config": True,
            },
            "api_auth": {"jwt_secret": secrets.token_hex(32)},
            "dag_processor": {
                "refresh_interval": 5,
                "min_file_process_interval": 10,
                "parsing_processes": 1,
                "print_stats_interval": 300,
                "bundle_refresh_check_interval": 2,
            },
            "scheduler": {
                "scheduler_heartbeat_sec": 1,
                "job_heartbeat_sec": 2,
                "scheduler_idle_sleep_time": 0.25,
                "parsing_cleanup_interval": 30,
                "enable_health_check": False,
            },
            "triggerer": {"job_heartbeat_sec": 2},
            "logging": {
                "base_log_folder": self.logs_dir,
                "dag_processor_child_process_log_directory": self.logs_dir / "dag_processor",
                "colored_console_log": False,
                "logging_level": "INFO",
            },
        }
        return settings

    def _airflow2_settings(self, db_url: str) -> dict[str, dict[str, Any]]:
        """Airflow 2: webserver + ``/api/v1`` without auth; the DAG-processing knobs live in ``[scheduler]``."""
        cfg = self.config
        executor = cfg.executor or ("SequentialExecutor" if db_url.startswith("sqlite") else "LocalExecutor")
        return {
            "core": {
                "dags_folder": cfg.dags_folder,
                "load_examples": False,
                "executor": executor,
                "parallelism": cfg.parallelism,
                "fernet_key": _fernet_key(),
                "dags_are_paused_at_creation": True,
                "min_serialized_dag_update_interval": 5,
                "dagbag_import_timeout": 60,
            },
            "database": {"sql_alchemy_conn": db_url, "load_default_connections": False},
            "api": {
                "auth_backends": "airflow.api.auth.backend.default",  # no login: test deployment only
                "enable_xcom_deserialize_support": True,
            },
            "webserver": {
                "web_server_host": "127.0.0.1",
                "web_server_port": self.api_port,
                "base_url": self.api_url,
                "workers": 1,
                "secret_key": secrets.token_hex(16),
                "warn_deployment_exposure": False,
                "config_file": self.home / "webserver_config.py",
            },
            "scheduler": {
                "standalone_dag_processor": self.dag_processor,
                "dag_dir_list_interval": 5,
                "min_file_process_interval": 10,
                "parsing_processes": 1,
                "print_stats_interval": 300,
                "scheduler_heartbeat_sec": 1,
                "job_heartbeat_sec": 2,
                "scheduler_idle_sleep_time": 0.25,
                "parsing_cleanup_interval": 30,
                "enable_health_check": False,
                "child_process_log_directory": self.logs_dir / "scheduler",
            },
            "triggerer": {"job_heartbeat_sec": 2},
            "logging": {
                "base_log_folder": self.logs_dir,
                "dag_processor_manager_log_location": self.logs_dir / "dag_processor_manager.log",
                "colored_console_log": False,
                "logging_level": "INFO",
            },
        }

    def _build_env(self) -> dict[str, str]:
        env = self._base_env()
        settings = self.airflow_settings()
        for section, values in self.config.airflow_config.items():
            settings.setdefault(section, {}).update(values)
        for section, values in settings.items():
            for key, value in values.items():
                env[f"AIRFLOW__{section.upper()}__{key.upper()}"] = _config_value(value)
        if self.simulator is not None:
            env["AIRFLOW_CONN_COMETAPI_DEFAULT"] = json.dumps(
                self.simulator.connection(**dict(self.config.connection_extra))
            )
        if not self.airflow3:
            # Anonymous requests get the Admin role: the REST API needs no login (test deployment only).
            Path(settings["webserver"]["config_file"]).write_text(
                "from flask_appbuilder.const import AUTH_DB\n\n"
                "AUTH_TYPE = AUTH_DB\n"
                'AUTH_ROLE_PUBLIC = "Admin"\n'
                "WTF_CSRF_ENABLED = False\n"
            )
        if self.config.auth == "password":
            # The simple auth manager only generates passwords for users missing from this file.
            path = Path(settings["core"]["simple_auth_manager_passwords_file"])
            path.write_text(json.dumps({"admin": self.config.admin_password}))
        if not self.airflow3 and env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor":
            if env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite"):
                # Airflow 2 refuses LocalExecutor on SQLite unless this (test-only) variable is set.
                env["_AIRFLOW__SKIP_DATABASE_EXECUTOR_COMPATIBILITY_CHECK"] = "1"
        env.update(self.config.extra_env)
        return env

    def _token(self, session: requests.Session) -> str | None:
        response = session.post(
            f"{self.api_url}/auth/token",
            json={"username": "admin", "password": self.config.admin_password},
            timeout=15,
        )
        if response.status_code not in (200, 201):
            raise DeploymentError(f"POST /auth/token answered {response.status_code}: {response.text[:500]}")
        return response.json()["access_token"]

    # -- processes --------------------------------------------------------------------------------------

    def _popen(self, comp: Component, env: Mapping[str, str] | None = None) -> None:
        with open(comp.log_path, "ab") as log:
            comp.proc = subprocess.Popen(
                comp.argv,
                cwd=self.home,
                env=dict(env if env is not None else self.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        comp.stopped = False

    def _start_component(self, name: str, airflow_args: Sequence[str]) -> Component:
        argv = [self.config.python, "-m", "airflow", *airflow_args]
        comp = Component(name=name, argv=argv, log_path=self.component_logs / f"{name}.log")
        self.components[name] = comp
        self._popen(comp)
        return comp

    def add_triggerer(self, index: int | None = None) -> Component:
        """Start one more ``airflow triggerer`` (named ``triggerer-<index>``)."""
        if index is None:
            index = sum(1 for name in self.components if name.startswith("triggerer-"))
        return self._start_component(f"triggerer-{index}", ["triggerer", "--skip-serve-logs"])

    def stop_component(self, name: str, *, sig: int = signal.SIGTERM, grace: float | None = None) -> int | None:
        """Stop one component's process group (``sig``, then SIGKILL after ``grace``); returns its exit code."""
        comp = self.components[name]
        comp.stopped = True
        comp.signal_group(sig)
        if sig != signal.SIGKILL:
            _group_wait([comp], time.monotonic() + (self.config.stop_grace if grace is None else grace))
        if comp.alive or (comp.proc is not None and _group_has_members(comp.proc.pid)):
            comp.signal_group(signal.SIGKILL)
            _group_wait([comp], time.monotonic() + 5)
        return comp.returncode

    def restart_component(self, name: str, **stop_kwargs: Any) -> Component:
        """Stop a component and start it again with the same command line (its log is appended to)."""
        self.stop_component(name, **stop_kwargs)
        comp = self.components[name]
        self._popen(comp)
        return comp

    def check_alive(self) -> None:
        """Raise :class:`DeploymentError` if a component that should run has exited."""
        dead = [c for c in self.components.values() if c.proc is not None and not c.stopped and not c.alive]
        if dead:
            names = ", ".join(f"{c.name} (exit {c.returncode})" for c in dead)
            raise DeploymentError(f"component(s) died: {names}\n{self.diagnostics()}")

    # -- simulator ----------------------------------------------------------------------------------------

    def _start_simulator(self) -> None:
        cfg = self.config
        port = free_port()
        argv = [cfg.python, "-m", "airflow_comet.testing", "--port", str(port), "--api-key", cfg.api_key]
        argv += ["--seed", str(cfg.simulator_seed)]
        if cfg.simulator_faults:
            argv += ["--faults", json.dumps(dict(cfg.simulator_faults))]
        comp = Component(name="simulator", argv=argv, log_path=self.component_logs / "simulator.log")
        self.components["simulator"] = comp
        self._popen(comp, env=self._base_env())
        # Known before it answers, so the connection can be written while it starts.
        self.simulator = SimulatorClient(f"http://127.0.0.1:{port}", cfg.api_key)

    def _wait_for_simulator(self) -> None:
        comp = self.components["simulator"]
        pattern = re.compile(r"CometAPI simulator listening on (http://\S+)")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = pattern.search(comp.tail(20))
            if match:
                assert self.simulator is not None and match.group(1).rstrip("/") == self.simulator.base_url, match
                self.simulator.faults()  # answers
                return
            if not comp.alive:
                break
            time.sleep(0.1)
        raise DeploymentError(f"the simulator did not start (exit {comp.returncode})\n{comp.tail()}")

    # -- start-up steps -------------------------------------------------------------------------------------

    def airflow_cli(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``airflow <args>`` with the deployment's environment (output appended to ``cli.log``)."""
        log_path = self.component_logs / "cli.log"
        with open(log_path, "ab") as log:
            log.write(f"\n$ airflow {' '.join(args)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                [self.config.python, "-m", "airflow", *args],
                cwd=self.home,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise DeploymentError(
                    f"airflow {' '.join(args)} did not finish within {timeout:.0f} s\n{tail_file(log_path)}"
                ) from None
        if check and code != 0:
            raise DeploymentError(f"airflow {' '.join(args)} exited {code}\n{tail_file(log_path, 80)}")
        return subprocess.CompletedProcess(proc.args, code)

    def _migrate(self) -> None:
        if self.config.reset_database:
            self.airflow_cli("db", "reset", "--yes", "--skip-init", timeout=self.config.migrate_timeout)
        self.airflow_cli("db", "migrate", timeout=self.config.migrate_timeout)

    def wait_for_api(self, deadline: float) -> None:
        """Until the health endpoint (``/api/v2/monitor/health``, Airflow 2: ``/api/v1/health``) answers 200."""
        url = f"{self.api_url}/api/v2/monitor/health" if self.airflow3 else f"{self.api_url}/api/v1/health"

        def healthy() -> bool:
            try:
                return _direct().get(url, timeout=5).status_code == 200
            except requests.RequestException:
                return False

        self.wait_until(healthy, deadline, f"the API server to answer {url}", interval=0.5)

    def _warm_up(self, deadline: float) -> None:
        """The first core-API and execution-API requests of a new api-server are slow (lazy imports and
        app start-up): make them now, not in a task's first heartbeat."""
        t0 = time.monotonic()
        self.api.get("dags", params={"limit": 1}, timeout=60)
        if not self.airflow3:
            self.timings["warm_up"] = time.monotonic() - t0
            return
        for path in ("/execution/health", "/execution/health/ping"):
            try:
                # A non-Bearer header comes first: with all_admins the api-server appends its admin Bearer
                # token to every request, and the execution API's JWT-reissue middleware would log a
                # traceback about that token's audience.
                response = _direct().get(f"{self.api_url}{path}", headers={"Authorization": "Basic e2e"}, timeout=60)
            except requests.RequestException:
                continue
            if response.status_code < 500:
                break
        self.timings["warm_up"] = time.monotonic() - t0

    def wait_for_jobs(self, deadline: float) -> None:
        """Until every scheduler, triggerer and dag-processor has a live job (heartbeating)."""
        wanted = {"SchedulerJob": self.config.schedulers, "TriggererJob": self.config.triggerers}
        if self.dag_processor:
            wanted["DagProcessorJob"] = 1
        if not self.airflow3:
            # No jobs endpoint: /api/v1/health reports the latest heartbeat of each kind.
            kinds = {"SchedulerJob": "scheduler", "TriggererJob": "triggerer", "DagProcessorJob": "dag_processor"}

            def healthy() -> bool:
                health = self.api.health()
                return all(
                    (health.get(kinds[kind]) or {}).get("status") == "healthy" for kind, n in wanted.items() if n
                )

            self.wait_until(healthy, deadline, f"healthy {sorted(k for k, n in wanted.items() if n)}", interval=0.5)
            return

        def live() -> bool:
            jobs = self.api.jobs(alive=True)
            counts: dict[str, int] = {}
            for job in jobs:
                if job.get("state") == "running":
                    counts[job["job_type"]] = counts.get(job["job_type"], 0) + 1
            return all(counts.get(kind, 0) >= n for kind, n in wanted.items())

        self.wait_until(live, deadline, f"live jobs {wanted}", interval=0.5)

    # -- waiting ------------------------------------------------------------------------------------------

    def wait_until(
        self, predicate: Callable[[], Any], deadline: float, what: str, *, interval: float = 0.3
    ) -> Any:
        """Call ``predicate`` until it returns something truthy (returned); ``deadline`` is monotonic.

        Fails early when a component died; on timeout the message has every component's log tail."""
        last_error: BaseException | None = None
        while True:
            if self._started:
                self.check_alive()
            try:
                result = predicate()
            except DeploymentError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried until the deadline, reported then
                last_error = exc
                result = None
            if result:
                return result
            if time.monotonic() >= deadline:
                detail = f" (last error: {last_error!r})" if last_error else ""
                raise DeploymentError(f"timed out waiting for {what}{detail}\n{self.diagnostics()}")
            time.sleep(interval)

    def wait_for_dag(self, dag_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Until the dag-processor has parsed ``dag_id`` (``GET /dags/{dag_id}`` answers 200)."""
        try:
            return self.wait_until(
                lambda: self.api.dag(dag_id), time.monotonic() + timeout, f"DAG {dag_id} to be parsed", interval=0.5
            )
        except DeploymentError as exc:
            try:
                errors: Any = self.api.import_errors()
            except Exception as err:  # noqa: BLE001
                errors = f"(unavailable: {err!r})"
            raise DeploymentError(f"{exc}\nimport errors: {errors}") from None

    def wait_for_run(
        self, dag_id: str, run_id: str, timeout: float = 120.0, states: Sequence[str] = tuple(TERMINAL_RUN_STATES)
    ) -> dict[str, Any]:
        """Until the run is in one of ``states`` (default: finished); returns the run."""

        def finished() -> dict[str, Any] | None:
            run = self.api.dag_run(dag_id, run_id)
            return run if run["state"] in states else None

        try:
            return self.wait_until(finished, time.monotonic() + timeout, f"run {dag_id}/{run_id} to reach {states}")
        except DeploymentError as exc:
            raise DeploymentError(f"{exc}\n{self.run_report(dag_id, run_id)}") from None

    def run_and_wait(
        self, dag_id: str, *, conf: Mapping[str, Any] | None = None, timeout: float = 120.0, watch: bool = True
    ) -> tuple[dict[str, Any], StateWatcher | None]:
        """Unpause, trigger, wait for the end (watching task states); returns ``(run, watcher)``."""
        self.api.unpause(dag_id)
        run_id = self.api.trigger(dag_id, conf=conf)
        if not watch:
            return self.wait_for_run(dag_id, run_id, timeout), None
        with self.api.watch(dag_id, run_id) as watcher:
            run = self.wait_for_run(dag_id, run_id, timeout)
        return run, watcher

    # -- logs and diagnostics ---------------------------------------------------------------------------

    def task_log_dir(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> Path:
        path = self.logs_dir / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        return path / f"map_index={map_index}" if map_index >= 0 else path

    def task_log_files(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[Path]:
        """The worker's task logs (``attempt=N.log``) of one task instance."""
        folder = self.task_log_dir(dag_id, run_id, task_id, map_index)
        return sorted(p for p in folder.glob("attempt=*.log") if ".trigger." not in p.name)

    def trigger_log_files(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[Path]:
        """The triggerer's logs for one task instance: ``attempt=N.log.trigger.<triggerer job id>.log``."""
        folder = self.task_log_dir(dag_id, run_id, task_id, map_index)
        return sorted(folder.glob("attempt=*.log.trigger.*.log"))

    def all_log_files(self) -> list[Path]:
        """Every file under ``AIRFLOW_HOME/logs`` (task, trigger, dag-processor logs)."""
        return sorted(p for p in self.logs_dir.rglob("*") if p.is_file())

    def files_containing(self, needle: str, files: Sequence[Path] | None = None) -> list[Path]:
        """The files (default: everything under ``AIRFLOW_HOME/logs``) whose text contains ``needle``."""
        data = needle.encode()
        return [p for p in (self.all_log_files() if files is None else files) if data in p.read_bytes()]

    def run_report(self, dag_id: str, run_id: str) -> str:
        """Task instance states and the tail of each task's logs (for failure messages)."""
        lines = [f"--- run {dag_id}/{run_id}"]
        try:
            for ti in self.api.task_instances(dag_id, run_id):
                lines.append(
                    f"  {ti['task_id']}[{ti.get('map_index', -1)}]: {ti.get('state')} try {ti.get('try_number')}"
                )
        except Exception as exc:  # noqa: BLE001
            lines.append(f"  (task instances unavailable: {exc!r})")
        run_dir = self.logs_dir / f"dag_id={dag_id}" / f"run_id={run_id}"
        for path in sorted(p for p in run_dir.rglob("*.log") if p.is_file()):
            lines.append(f"--- {path.relative_to(self.logs_dir)} (tail)")
            lines.append(tail_file(path, self.config.tail_lines))
        return "\n".join(lines)

    def diagnostics(self, lines: int | None = None) -> str:
        """The tail of every component's log."""
        n = lines or self.config.tail_lines
        out = [f"=== AIRFLOW_HOME {self.home}"]
        for comp in self.components.values():
            status = "running" if comp.alive else f"exited {comp.returncode}"
            out.append(f"=== {comp.name} (pid {comp.pid}, {status}) {comp.log_path}")
            out.append(comp.tail(n))
        cli = self.component_logs / "cli.log"
        if cli.exists():
            out.append(f"=== cli {cli}")
            out.append(tail_file(cli, 15))
        return "\n".join(out)


def _direct() -> requests.Session:
    """A session that ignores proxy settings from the environment (everything here is on 127.0.0.1)."""
    session = requests.Session()
    session.trust_env = False
    return session


def _config_value(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _mkdtemp() -> str:
    return tempfile.mkdtemp(prefix="airflow-e2e-")
