"""Small helpers the reliability scenarios share: starting a scenario's run, waiting on task and trigger
states, reading the simulator's request log, mapping triggerer processes to their jobs, and signalling
processes."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from airflow_comet.operators._waiting import XCOM_DEFERRED_PREDICTION_ID
from tests.e2e.deployment import AirflowDeployment, Component, SimulatorClient
from tests.reliability.common import TRIGGERER_HEALTH_THRESHOLD

# --------------------------------------------------------------------------------------------------------
# starting a scenario (the deployment is shared: each scenario starts from an empty simulator)
# --------------------------------------------------------------------------------------------------------


def fresh_simulator(dep: AirflowDeployment, **faults: Any) -> SimulatorClient:
    """The deployment's simulator with the earlier scenarios' predictions and requests forgotten and
    ``faults`` set (``SimulatorClient.set_faults``), so that a scenario counts only its own requests."""
    sim = dep.simulator
    assert sim is not None, "the deployment runs without its CometAPI simulator"
    sim.reset()
    sim.set_faults(**faults)
    return sim


def unpause_when_parsed(dep: AirflowDeployment, dag_id: str, timeout: float = 60.0) -> None:
    """Wait until the dag-processor has parsed ``dag_id`` (at most ``timeout`` s), then unpause it: the
    deployment creates DAGs paused."""
    dep.wait_for_dag(dag_id, timeout=timeout)
    dep.api.unpause(dag_id)


def start_run(
    dep: AirflowDeployment, dag_id: str, conf: dict[str, Any] | None = None, *, parse_timeout: float = 60.0
) -> str:
    """:func:`unpause_when_parsed`, then trigger a run of ``dag_id`` with ``conf``; returns its run id."""
    unpause_when_parsed(dep, dag_id, timeout=parse_timeout)
    return dep.api.trigger(dag_id, conf=conf)


# --------------------------------------------------------------------------------------------------------
# waiting
# --------------------------------------------------------------------------------------------------------


def wait(dep: AirflowDeployment, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.3) -> Any:
    """``predicate()`` until truthy (returned); fails with every component's log tail after ``timeout`` s."""
    return dep.wait_until(predicate, time.monotonic() + timeout, what, interval=interval)


def all_pages(dep: AirflowDeployment, path: str, key: str) -> list[dict[str, Any]]:
    """Every item of a list endpoint of the REST API (``path``; the items under ``key``): it pages at 100."""
    out: list[dict[str, Any]] = []
    while True:
        page = dep.api.get(path, params={"limit": 100, "offset": len(out)})
        out += page[key]
        if len(out) >= page["total_entries"] or not page[key]:
            return out


def task_instances(dep: AirflowDeployment, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """Every task instance of the run (mapped ones included, past the API's first page)."""
    return all_pages(dep, f"dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances", "task_instances")


def running_trigger(dep: AirflowDeployment, dag_id: str, run_id: str, task_id: str, timeout: float = 60.0) -> int:
    """Wait until the task is deferred, a triggerer holds its trigger, and the trigger has checked the
    prediction at least once (the simulator's request log; the trigger logs status changes at DEBUG only);
    returns the triggerer's job id. On Airflow 3 also until that triggerer's log for the task says it runs
    the trigger (Airflow's "trigger ... starting" line, which tells two triggerers apart; Airflow 2 logs it
    in the triggerer's own log, not the task's, and its deployments here have one triggerer)."""

    def held() -> int | None:
        ti = dep.api.task_instance(dag_id, run_id, task_id)
        trigger = ti.get("trigger") or {}
        job = trigger.get("triggerer_id")
        if ti.get("state") != "deferred" or not job:
            return None
        if dep.airflow3 and not TRIGGER_STARTED.search(trigger_log(dep, dag_id, run_id, task_id, job)):
            return None
        return job if status_checks(dep, dag_id, run_id, task_id) else None

    return wait(dep, held, timeout, f"{dag_id}.{task_id} to be deferred and polled by a triggerer", interval=0.3)


#: What Airflow 3's triggerer logs, in the trigger's own log, as it starts running a trigger.
TRIGGER_STARTED = re.compile(r"trigger \S+ \(ID \d+\) starting")


def status_checks(dep: AirflowDeployment, dag_id: str, run_id: str, task_id: str) -> list[dict[str, Any]]:
    """The status checks the simulator answered for the prediction the task deferred on."""
    assert dep.simulator is not None
    prediction_id = dep.api.xcom(dag_id, run_id, task_id, key=XCOM_DEFERRED_PREDICTION_ID)
    return dep.simulator.requests(prediction_id=prediction_id, endpoint="status")


def trigger_moved(
    dep: AirflowDeployment,
    dag_id: str,
    run_id: str,
    task_id: str,
    *,
    away_from: int,
    what: str,
    timeout: float = TRIGGERER_HEALTH_THRESHOLD * 6,
) -> int:
    """Wait until a triggerer other than job ``away_from`` holds the task's trigger; returns that job's id.
    ``what`` names the wait in the failure message.

    Another triggerer takes the trigger over only once its holder's heartbeat is older than the health
    threshold (stopped or killed holder); the default timeout allows six times that."""

    def moved() -> int | None:
        trigger = dep.api.task_instance(dag_id, run_id, task_id).get("trigger") or {}
        job = trigger.get("triggerer_id")
        return job if job and job != away_from else None

    return wait(dep, moved, timeout, what)


def trigger_log(
    dep: AirflowDeployment, dag_id: str, run_id: str, task_id: str, job_id: int, try_number: int = 1
) -> str:
    """What one triggerer (by job id) logged for the task's trigger."""
    path = dep.task_log_dir(dag_id, run_id, task_id) / f"attempt={try_number}.log.trigger.{job_id}.log"
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of an Airflow 3 task/trigger log (other lines skipped)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


_TRACEBACK_LAST_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Timeout))(?:: (.*))?$", re.MULTILINE)


def task_error(dep: AirflowDeployment, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> tuple[str, str]:
    """``(exception type, message)`` the task's last try failed with, from its log: Airflow 3's JSON
    ``error_detail``, or the last line of an Airflow 2 traceback."""
    files = dep.task_log_files(dag_id, run_id, task_id, map_index)
    for path in reversed(files):
        for event in reversed(log_events(path)):
            details = event.get("error_detail")
            if details:
                return details[0].get("exc_type", ""), details[0].get("exc_value", "")
        matches = _TRACEBACK_LAST_LINE.findall(path.read_text(errors="replace"))
        if matches:
            exc_type, message = matches[-1]
            return exc_type.rsplit(".", 1)[-1], message
    return "", ""


# --------------------------------------------------------------------------------------------------------
# the simulator's request log
# --------------------------------------------------------------------------------------------------------


def creates(requests: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Creates that made a prediction (2xx)."""
    return [r for r in requests if r["endpoint"] == "create" and 200 <= r["status"] < 300]


def cancels(requests: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in requests if r["endpoint"] == "cancel"]


def polls_per_prediction(requests: Iterable[dict[str, Any]]) -> Counter:
    """Status requests per prediction id, whatever they were answered (429 and 5xx included)."""
    return Counter(r["prediction_id"] for r in requests if r["endpoint"] == "status")


def poll_figures(requests: list[dict[str, Any]], prediction_ids: Iterable[str]) -> dict[str, Any]:
    counts = polls_per_prediction(requests)
    values = sorted(counts.get(pid, 0) for pid in prediction_ids)
    if not values:
        return {"polls_per_prediction": "n/a"}
    return {
        "polls_per_prediction_mean": round(sum(values) / len(values), 2),
        "polls_per_prediction_max": values[-1],
        "polls_per_prediction_min": values[0],
    }


def prediction_of(sim: Any, model: str) -> dict[str, Any]:
    found = [p for p in sim.predictions() if p["model"] == model]
    assert len(found) == 1, f"expected one prediction of {model}, found {found}"
    return found[0]


# --------------------------------------------------------------------------------------------------------
# triggerers: which process is which job
# --------------------------------------------------------------------------------------------------------


def triggerer_jobs(dep: AirflowDeployment) -> dict[str, int]:
    """Component name -> TriggererJob id (kept on the deployment by :func:`add_mapped_triggerer`)."""
    return dep.__dict__.setdefault("reliability_triggerer_jobs", {})


def _live_triggerer_job_ids(dep: AirflowDeployment) -> set[int]:
    return {j["id"] for j in dep.api.jobs("TriggererJob", alive=True) if j.get("state") == "running"}


def map_running_triggerers(dep: AirflowDeployment) -> None:
    """Record the job of the single triggerer a deployment was started with."""
    names = [name for name, comp in dep.components.items() if name.startswith("triggerer-") and comp.alive]
    ids = wait(dep, lambda: _live_triggerer_job_ids(dep), 60, "a live triggerer job")
    assert len(names) == 1 and len(ids) == 1, f"map_running_triggerers needs exactly one triggerer: {names} {ids}"
    triggerer_jobs(dep)[names[0]] = ids.pop()


def add_mapped_triggerer(dep: AirflowDeployment, timeout: float = 90.0) -> tuple[str, int]:
    """Start one more triggerer and wait for its job: the only new live TriggererJob is its own.

    Job rows carry no pid and every triggerer here has the same hostname, so starting them one at a time is
    what tells which process holds which job (and so which one to stop when a trigger is on job N)."""
    known = set(triggerer_jobs(dep).values()) | _live_triggerer_job_ids(dep)
    comp = dep.add_triggerer()

    def new_job() -> int | None:
        fresh = _live_triggerer_job_ids(dep) - known
        return min(fresh) if fresh else None

    job = wait(dep, new_job, timeout, f"a job for {comp.name}", interval=0.5)
    triggerer_jobs(dep)[comp.name] = job
    return comp.name, job


def component_of_job(dep: AirflowDeployment, job_id: int) -> Component:
    for name, job in triggerer_jobs(dep).items():
        if job == job_id:
            return dep.components[name]
    raise AssertionError(f"no known triggerer runs job {job_id}: {triggerer_jobs(dep)}")


def live_triggerers(dep: AirflowDeployment) -> list[str]:
    return [n for n, c in dep.components.items() if n.startswith("triggerer-") and c.alive and not c.stopped]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def signal_component(comp: Component, sig: int) -> None:
    """``sig`` to the component's process group (the triggerer and its trigger-runner subprocess)."""
    comp.signal_group(sig)


def is_stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def set_task_state(dep: AirflowDeployment, dag_id: str, run_id: str, task_id: str, state: str) -> dict[str, Any]:
    """What "Mark failed/success" in the UI does: ``PATCH .../taskInstances/{task_id}`` with ``new_state``."""
    path = f"dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}"
    body: dict[str, Any] = {"new_state": state}
    if not dep.airflow3:
        body["dry_run"] = False
    return dep.api.request("PATCH", path, json=body).json()
