"""PredictionBatchOperator run for real with ``dag.test()`` against the simulator: the window, exactly-once
creates, rows and files, failures and retries of items, inputs from XCom and files, the task state store."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import pytest

from airflow_comet.batch_state import BatchState, progress_line
from airflow_comet.hooks._protocol import iso_epoch
from airflow_comet.operators.batch import PredictionBatchOperator
from airflow_comet.testing import Faults
from airflow_comet.triggers.batch import PredictionBatchTrigger
from tests.dagrun import AIRFLOW_3_3, run, states, task, xcom
from tests.test_dags import FLUX, dag

PROMPTS = [f"prompt number {i}" for i in range(30)]


def batch_inputs(prompts=PROMPTS) -> list[dict]:
    return [{"prompt": p, "output_format": "png"} for p in prompts]


def most_running_at_once(sim) -> int:
    """The most predictions the simulator had running (created, not yet ended) at any moment."""
    moments = []
    for p in sim.predictions():
        moments.append((iso_epoch(p["created_at"]), 1))
        moments.append((p["sim_terminal_epoch"], -1))
    running = peak = 0
    for _, change in sorted(moments, key=lambda m: (m[0], m[1])):  # an end before a create at the same instant
        running += change
        peak = max(peak, running)
    return peak


def created_prompts(sim) -> list[str]:
    return sorted(p["input"]["prompt"] for p in sim.predictions())


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def check_files(rows: list[dict]) -> None:
    for row in rows:
        if row["status"] != "succeeded":
            continue
        assert row["files"], row
        for record in row["files"]:
            data = Path(record["path"].removeprefix("file://")).read_bytes()
            assert hashlib.sha256(data).hexdigest() == record["sha256"] and len(data) == record["size"]
            assert record["content_type"] == "image/png"


@pytest.mark.parametrize("deferrable", [True, False], ids=["deferrable", "in_worker"])
def test_a_batch_creates_every_input_once_never_more_than_max_in_flight(sim, tmp_path, deferrable):
    with dag(f"t_batch_window_{deferrable}") as d:
        PredictionBatchOperator(
            task_id="batch", model=FLUX, inputs=batch_inputs(), max_in_flight=4, destination=f"file://{tmp_path}/",
            deferrable=deferrable, poll_interval=2,
        )
    dr = run(d)
    assert states(dr) == {"batch": "success"}
    assert [r.status for r in sim.creates()] == [201] * 30
    assert created_prompts(sim) == sorted(PROMPTS)
    assert 2 <= most_running_at_once(sim) <= 4
    rows = xcom(dr, "batch")
    assert [row["input"]["prompt"] for row in rows] == PROMPTS
    assert [row["index"] for row in rows] == list(range(30))
    assert {row["status"] for row in rows} == {"succeeded"} and {row["attempts"] for row in rows} == {1}
    check_files(rows)
    assert manifest(tmp_path) == json.loads(json.dumps(rows))
