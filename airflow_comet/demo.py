"""``make demo``: run the example nightly batch end to end and leave the images in ``./output/``.

Without ``COMETAPI_KEY`` in the environment it starts the built-in CometAPI simulator on 127.0.0.1 and
points the ``cometapi_default`` connection at it; with the key set it talks to the real CometAPI
(``COMETAPI_HOST`` overrides the host). The DAG (``comet_nightly_batch``) runs for real with ``dag.test()``:
tasks, XCom, the batch's trigger, and its images and manifest written into ``./output/``.

A newcomer sees one screen: the connection used, each task's progress as it happens, and where the images
are. Airflow's own log records go to a file whose path is printed first.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

DAG_ID = "comet_nightly_batch"
REPO = Path(__file__).resolve().parent.parent
DAGS = REPO / "dags_examples"
PROMPTS = DAGS / "data" / "prompts.csv"
MODEL = "black-forest-labs/flux-schnell"
#: How often the progress lines are refreshed from the run's task instances.
PROGRESS_EVERY = 1.0
#: The batch operator's progress line in Airflow's log: ``3/4 succeeded, 0 failed, 1 running, 0 waiting``.
_BATCH_PROGRESS = re.compile(rb"\d+/\d+ succeeded, \d+ failed, \d+ running, \d+ waiting[^\n\"\[]*")


@contextlib.contextmanager
def _cometapi() -> Iterator[tuple[str, bool]]:
    """Point ``cometapi_default`` at the real API (key in the environment) or at a fresh simulator."""
    key = os.environ.get("COMETAPI_KEY", "").strip()
    if key:
        host = os.environ.get("COMETAPI_HOST", "https://api.cometapi.com")
        os.environ["AIRFLOW_CONN_COMETAPI_DEFAULT"] = json.dumps(
            {"conn_type": "cometapi", "password": key, "host": host}
        )
        yield f"the real CometAPI at {host}", True
        return
    from airflow_comet.testing import CometAPISimulator

    with CometAPISimulator(api_key="demo-key") as sim:
        os.environ["AIRFLOW_CONN_COMETAPI_DEFAULT"] = sim.connection_json()
        yield f"the built-in CometAPI simulator at {sim.base_url} (set COMETAPI_KEY to use the real API)", False


@contextlib.contextmanager
def _output_to(log_path: Path) -> Iterator[TextIO]:
    """Send everything written to stdout/stderr (Airflow's log records, at the file-descriptor level, so
    child processes too) to ``log_path``; yield a stream to the terminal for the demo's own lines."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


class _Progress(threading.Thread):
    """Prints a line whenever a task's states change: ``create  2 success, 2 running``."""

    def __init__(self, out: TextIO, dag_id: str, started: float, log_path: Path) -> None:
        super().__init__(daemon=True, name="demo-progress")
        self.out = out
        self.dag_id = dag_id
        self.started = started
        self.seen: dict[str, str] = {}
        self.log_path = log_path
        self.log_offset = log_path.stat().st_size if log_path.exists() else 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(PROGRESS_EVERY):
            self.report()

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.report()

    def report(self) -> None:
        try:
            states = _task_states(self.dag_id)
        except Exception:  # noqa: BLE001 - progress is a courtesy; the run's result is what counts
            return
        for task_id, counts in states.items():
            text = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
            if self.seen.get(task_id) != text:
                self.seen[task_id] = text
                self.say(task_id, text)
        self.report_batch()

    def report_batch(self) -> None:
        """The batch's own progress line, the newest one logged since the last look."""
        with open(self.log_path, "rb") as log:
            log.seek(self.log_offset)
            new = log.read()
        self.log_offset += len(new)
        lines = _BATCH_PROGRESS.findall(new)
        if lines and lines[-1].decode().strip() != self.seen.get("batch progress"):
            self.seen["batch progress"] = lines[-1].decode().strip()
            self.say("  predictions", self.seen["batch progress"])

    def say(self, what: str, text: str) -> None:
        self.out.write(f"  [{time.monotonic() - self.started:5.1f} s] {what:<13} {text}\n")


def _task_states(dag_id: str) -> dict[str, Counter[str]]:
    """``{task_id: Counter(state)}`` of the newest run of ``dag_id``, in the order tasks first appear."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run_id = session.scalar(
            select(DagRun.run_id).where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).limit(1)
        )
        rows = session.execute(
            select(TaskInstance.task_id, TaskInstance.state, TaskInstance.start_date)
            .where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
            .order_by(TaskInstance.start_date.is_(None), TaskInstance.start_date, TaskInstance.map_index)
        ).all()
    states: dict[str, Counter[str]] = {}
    for task_id, state, _ in rows:
        states.setdefault(task_id, Counter())[str(getattr(state, "value", state) or "not started")] += 1
    return states


def _prompt_count() -> int:
    with PROMPTS.open(newline="") as handle:
        return sum(1 for _ in csv.DictReader(handle))


def main() -> int:
    output = Path(os.environ.get("AIRFLOW_COMET_DEMO_OUTPUT", "output")).resolve()
    output.mkdir(parents=True, exist_ok=True)
    home = Path(os.environ.get("AIRFLOW_HOME", Path.home() / "airflow")).resolve()
    log_path = home / "demo.log"
    # Read by the example DAG at parse time; Airflow reads its own settings when first imported.
    os.environ["AIRFLOW_COMET_OUTPUT"] = output.as_uri()
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    prompts = _prompt_count()

    print("airflow-comet demo")
    with _cometapi() as (target, paid), _output_to(log_path) as terminal:
        terminal.write(f"  CometAPI:      {target}\n")
        terminal.write(f"  pipeline:      {DAG_ID}, {prompts} prompts from {PROMPTS.relative_to(REPO)}\n")
        if paid:
            terminal.write(
                f"  This creates {prompts} predictions of {MODEL} on your CometAPI account: it costs money.\n"
            )
        terminal.write(f"  Airflow's log: {log_path}\n\n")
        dag = _load_dag()
        started = time.monotonic()
        progress = _Progress(terminal, DAG_ID, started, log_path)
        progress.start()
        try:
            dagrun = dag.test()
        finally:
            progress.stop()
        elapsed = time.monotonic() - started
        state = str(getattr(dagrun.state, "value", dagrun.state))
        terminal.write("\n")
        _summary(terminal, output, state, elapsed, log_path)
    return 0 if state == "success" else 1


def _summary(out: TextIO, output: Path, state: str, elapsed: float, log_path: Path) -> None:
    """Where the images are: the run's folder, the first image on its own line, the manifest."""
    manifests = sorted(output.rglob("manifest.jsonl"), key=lambda p: p.stat().st_mtime)
    if not manifests:
        out.write(f"Run {state} in {elapsed:.0f} s, and wrote no manifest: see {log_path}\n")
        return
    manifest = manifests[-1]
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    images = [f["path"].removeprefix("file://") for row in rows for f in row.get("files", [])]
    counts = Counter(row.get("status") for row in rows)
    outcome = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    out.write(f"Run {'succeeded' if state == 'success' else state} in {elapsed:.0f} s: {outcome}; ")
    out.write(f"{len(images)} images in\n  {manifest.parent}\n")
    if images:
        out.write(f"First image:\n  {images[0]}\n")
    out.write(f"Manifest (one line per prompt):\n  {manifest}\n")
    if state != "success":
        out.write(f"Airflow's log: {log_path}\n")


def _load_dag() -> Any:
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 2
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef]  # the same class, Airflow 2's home
    bag = DagBag(str(DAGS))
    if bag.import_errors:
        raise SystemExit(f"Example DAGs failed to import: {bag.import_errors}")
    return bag.dags[DAG_ID]


if __name__ == "__main__":
    sys.exit(main())
