"""PredictionBatchOperator run for real with ``dag.test()`` against the simulator: the window, exactly-once
creates, rows and files, failures and retries of items, inputs from XCom and files, the task state store."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import pytest

from airflow_comet.batch_inputs import inputs_digest
from airflow_comet.batch_state import BatchState, progress_line
from airflow_comet.hooks._protocol import iso_epoch
from airflow_comet.operators.batch import PredictionBatchOperator
from airflow_comet.testing import Faults
from airflow_comet.triggers.batch import PredictionBatchTrigger
from tests.conftest import API_KEY, set_connection
from tests.dagrun import AIRFLOW_3_3, run, states, task, xcom
from tests.test_dags import FLUX, _TaskInstance, dag

PROMPTS = [f"prompt number {i}" for i in range(30)]


@pytest.fixture(autouse=True)
def _no_minimum_deferral(monkeypatch):
    """``dag.test()`` runs triggers in its own process, without the scheduler race MIN_DEFERRAL works around:
    these tests need not wait for it (its own test sets it)."""
    monkeypatch.setattr("airflow_comet.operators.batch.MIN_DEFERRAL", 0.0)


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


def test_a_refused_prompt_fails_the_task_after_every_other_file_and_the_manifest_are_written(sim, tmp_path):
    sim.set_faults(Faults(durations=(0.3, 1.0), refused_words=("fox",)))
    prompts = ["a paper boat", "a fox reading", "a red lighthouse", "a city of books"]
    with dag("t_batch_refused") as d:
        PredictionBatchOperator(
            task_id="batch", model=FLUX, inputs=batch_inputs(prompts), max_in_flight=2,
            destination=f"file://{tmp_path}/", deferrable=True, poll_interval=2,
        )
    dr = run(d)
    assert states(dr) == {"batch": "failed"}
    rows = manifest(tmp_path)
    assert [row["status"] for row in rows] == ["succeeded", "failed", "succeeded", "succeeded"]
    assert "NSFW" in rows[1]["error"] and rows[1]["files"] == [] and rows[1]["prediction_id"]
    check_files(rows)
    assert len(list(tmp_path.glob("*.png"))) == 3
    # Still the task's result, for a downstream task with trigger_rule all_done.
    assert xcom(dr, "batch") == rows
    assert len(sim.creates()) == 4


@pytest.mark.parametrize("deferrable", [True, False], ids=["deferrable", "in_worker"])
def test_max_failures_lets_a_refused_prompt_pass_and_item_retries_creates_it_again(sim, deferrable):
    sim.set_faults(Faults(durations=(0.3, 1.0), refused_words=("fox",)))
    prompts = ["a paper boat", "a fox reading", "a red lighthouse"]
    with dag(f"t_batch_retries_{deferrable}") as d:
        PredictionBatchOperator(
            task_id="batch", model=FLUX, inputs=batch_inputs(prompts), max_in_flight=2, max_failures=1,
            item_retries=1, deferrable=deferrable, poll_interval=2,
        )
    dr = run(d)
    assert states(dr) == {"batch": "success"}
    rows = xcom(dr, "batch")
    assert [row["status"] for row in rows] == ["succeeded", "failed", "succeeded"]
    assert [row["attempts"] for row in rows] == [1, 2, 1]
    assert [row["files"] for row in rows] == [[], [], []]  # no destination: nothing downloaded
    fox = [p for p in sim.predictions() if "fox" in p["input"]["prompt"]]
    assert len(fox) == 2 and rows[1]["prediction_id"] == max(fox, key=lambda p: p["created_at"])["id"]
    assert not sim.downloads()


def test_inputs_from_an_upstream_task(sim):
    with dag("t_batch_xcomarg") as d:

        @task
        def prompts() -> list[dict]:
            return batch_inputs(["one", "two", "three"])

        PredictionBatchOperator(task_id="batch", model=FLUX, inputs=prompts(), deferrable=False, poll_interval=2)
    dr = run(d)
    assert states(dr) == {"prompts": "success", "batch": "success"}
    assert [row["input"]["prompt"] for row in xcom(dr, "batch")] == ["one", "two", "three"]
    assert created_prompts(sim) == ["one", "three", "two"]


def test_inputs_from_jsonl_and_csv_files(sim, tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a boat", "num_outputs": 2}\n\n{"prompt": "a fox", "seed": 7}\n')
    table = tmp_path / "prompts.csv"
    table.write_text("prompt,aspect_ratio\na lighthouse,16:9\na city,\n")
    with dag("t_batch_files") as d:
        PredictionBatchOperator(task_id="from_jsonl", model=FLUX, inputs=str(jsonl), deferrable=False, poll_interval=2)
        PredictionBatchOperator(task_id="from_csv", model=FLUX, inputs=f"file://{table}", deferrable=True, poll_interval=2)
    dr = run(d)
    assert states(dr) == {"from_jsonl": "success", "from_csv": "success"}
    assert [row["input"] for row in xcom(dr, "from_jsonl")] == [{"prompt": "a boat", "num_outputs": 2}, {"prompt": "a fox", "seed": 7}]
    # CSV values are text; an empty cell is left out rather than sent as "".
    assert [row["input"] for row in xcom(dr, "from_csv")] == [{"prompt": "a lighthouse", "aspect_ratio": "16:9"}, {"prompt": "a city"}]
    sent = {p["input"]["prompt"]: p["input"] for p in sim.predictions()}
    assert sent["a boat"]["num_outputs"] == 2 and sent["a city"] == {"prompt": "a city"}


def test_a_bad_line_in_the_inputs_file_fails_before_anything_is_created(sim, tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a boat"}\n["not", "an", "object"]\n')
    with dag("t_batch_bad_file") as d:
        PredictionBatchOperator(task_id="batch", model=FLUX, inputs=str(jsonl), deferrable=False)
    dr = run(d)
    assert states(dr) == {"batch": "failed"}
    assert sim.creates() == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "flux-schnell"}, "model"),
        ({"inputs": []}, "empty list"),
        ({"inputs": [{"prompt": "x"}, "text"]}, r"inputs\[1\] must be a dict"),
        ({"inputs": [{"prompt": float("nan")}]}, r"inputs\[0\]"),
        ({"inputs": {"prompt": "x"}}, "list of model inputs"),
        ({"inputs": "prompts.csv"}, "absolute path nor a URL"),
        ({"inputs": "s3://bucket/prompts.txt"}, r"\.jsonl, \.ndjson or \.csv"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_in_flight": True}, "max_in_flight"),
        ({"max_failures": -1}, "max_failures"),
        ({"item_retries": 1.5}, "item_retries"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"timeout": -5}, "timeout"),
        ({"destination": "images/"}, "absolute path"),
    ],
)
def test_static_mistakes_fail_when_the_dag_is_parsed(kwargs, message):
    arguments = {"task_id": "batch", "model": FLUX, "inputs": [{"prompt": "x"}], **kwargs}
    with pytest.raises(ValueError, match=message):
        PredictionBatchOperator(**arguments)


def test_templates_and_references_pass_the_parse_time_checks():
    PredictionBatchOperator(task_id="a", model="{{ params.model }}", inputs="{{ params.file }}")
    PredictionBatchOperator(task_id="b", model=FLUX, inputs=[{"prompt": "{{ ds }}"}], destination="{{ params.out }}")


class WorkerLostMidBatch(PredictionBatchOperator):
    """Its first try dies once 8 items exist, as a worker lost mid-batch would (ids already recorded)."""

    def execute(self, context):
        self._first_try = context["ti"].try_number == 1
        return super().execute(context)

    async def _fill(self, state, *args):
        outcomes = await super()._fill(state, *args)
        if self._first_try and state.next >= 8:
            raise RuntimeError("worker lost")
        return outcomes


def lost_worker_dag(dag_id: str, folder: Path):
    with dag(dag_id) as d:
        WorkerLostMidBatch(
            task_id="batch", model=FLUX, inputs=batch_inputs(), max_in_flight=4, destination=f"file://{folder}/",
            deferrable=False, poll_interval=2, retries=1, retry_delay=timedelta(seconds=0),
        )
    return d


@pytest.mark.skipif(not AIRFLOW_3_3, reason="the task state store arrived in Airflow 3.3")
def test_a_retry_after_a_lost_worker_creates_no_item_twice(sim, tmp_path):
    dr = run(lost_worker_dag("t_batch_lost_worker", tmp_path))
    assert states(dr) == {"batch": "success"}
    assert dr.get_task_instance("batch").try_number == 2
    assert [r.status for r in sim.creates()] == [201] * 30
    assert created_prompts(sim) == sorted(PROMPTS)
    rows = xcom(dr, "batch")
    assert {row["status"] for row in rows} == {"succeeded"} and {row["attempts"] for row in rows} == {1}
    # The first try's eight predictions are the rows' (resumed, not created again), files included.
    first_eight = {p["id"] for p in sorted(sim.predictions(), key=lambda p: p["created_at"])[:8]}
    assert {row["prediction_id"] for row in rows[:8]} == first_eight
    check_files(rows)


@pytest.mark.skipif(AIRFLOW_3_3, reason="documents the behaviour without a task state store")
def test_without_a_state_store_a_retry_creates_the_batch_again(sim, tmp_path):
    dr = run(lost_worker_dag("t_batch_lost_worker_old", tmp_path))
    assert states(dr) == {"batch": "success"}
    assert len(sim.creates()) == 38  # the first try's eight, then all thirty


@pytest.mark.parametrize("deferrable", [True, False], ids=["deferrable", "in_worker"])
def test_the_deadline_cancels_what_runs_and_reports_what_never_started(sim, tmp_path, deferrable):
    sim.set_faults(Faults(never_finish=True))
    with dag(f"t_batch_deadline_{deferrable}") as d:
        PredictionBatchOperator(
            task_id="batch", model=FLUX, inputs=batch_inputs(["a", "b", "c", "d"]), max_in_flight=2, timeout=3,
            destination=f"file://{tmp_path}/", deferrable=deferrable, poll_interval=2,
        )
    dr = run(d)
    assert states(dr) == {"batch": "failed"}
    rows = manifest(tmp_path)
    assert [row["status"] for row in rows] == ["timeout", "timeout", "missing", "missing"]
    assert "cancelled" in rows[0]["error"] and "deadline" in rows[2]["error"]
    assert sorted(r.prediction_id for r in sim.cancels()) == sorted(row["prediction_id"] for row in rows[:2])
    assert len(sim.creates()) == 2


def test_creates_keep_to_the_connections_request_budget(sim, monkeypatch):
    from tests.conftest import set_connection

    set_connection(monkeypatch, sim.base_url, max_requests_per_second=5)
    with dag("t_batch_paced") as d:
        PredictionBatchOperator(
            task_id="batch", model=FLUX, inputs=batch_inputs([f"p{i}" for i in range(8)]), max_in_flight=8,
            deferrable=True, poll_interval=2,
        )
    dr = run(d)
    assert states(dr) == {"batch": "success"}
    times = sorted(r.time for r in sim.creates())
    assert len(times) == 8
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.18  # 1.05 / 5 s apart, less network jitter


def test_on_kill_cancels_every_running_prediction(sim):
    from airflow_comet.hooks.cometapi import CometAPIHook

    sim.set_faults(Faults(never_finish=True))
    hook = CometAPIHook()
    ids = [hook.create_prediction(FLUX, {"prompt": f"p{i}"})["id"] for i in range(3)]
    operator = PredictionBatchOperator(task_id="batch", model=FLUX, inputs=batch_inputs(["a", "b", "c"]))
    operator._state = BatchState(total=3, digest="x", started_at=0.0, running=[[i, pid, 0.0, 1] for i, pid in enumerate(ids)])
    operator.on_kill()
    assert sorted(r.prediction_id for r in sim.cancels()) == sorted(ids)
    assert {sim.prediction(pid)["status"] for pid in ids} == {"canceled"}


def test_the_trigger_serializes_to_what_builds_it_again():
    trigger = PredictionBatchTrigger(
        running=[[0, "abc", 1.5], [3, "def", 2.0]], poll_interval=5, end_time=99.0, enough=2, hold=30.0,
        progress={"total": 10, "succeeded": 1, "failed": 0, "waiting": 7, "started_at": 1.0}, state={"version": 1},
    )
    path, kwargs = trigger.serialize()
    assert path == "airflow_comet.triggers.batch.PredictionBatchTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert PredictionBatchTrigger(**kwargs).serialize() == (path, kwargs)


def test_progress_line_reads_as_a_person_would_write_it():
    assert progress_line(1000, 412, 3, 64, 521, elapsed=127.0) == (
        "412/1000 succeeded, 3 failed, 64 running, 521 waiting; about 3 min left"
    )
    assert progress_line(10, 0, 0, 4, 6, elapsed=5.0) == "0/10 succeeded, 0 failed, 4 running, 6 waiting"


# -- the trigger on its own, as the triggerer runs it ---------------------------------------------------------


def created(sim, count: int, **faults) -> list[list]:
    from airflow_comet.hooks.cometapi import CometAPIHook

    if faults:
        sim.set_faults(Faults(**faults))
    hook = CometAPIHook()
    return [[i, hook.create_prediction(FLUX, {"prompt": f"p{i}"})["id"], time.time()] for i in range(count)]


async def first_event(trigger: PredictionBatchTrigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("the trigger ended without an event")


async def test_the_trigger_fires_once_enough_ended_and_hands_the_state_back(sim):
    running = created(sim, 4, durations={FLUX: lambda model, input: 0.2 if input["prompt"] in ("p0", "p2") else 60})
    event = await asyncio.wait_for(first_event(PredictionBatchTrigger(running, enough=2, state={"version": 1})), 20)
    assert event["status"] == "ended" and event["state"] == {"version": 1}
    assert [index for index, _ in event["ended"]] == [0, 2]
    for _, item in event["ended"]:
        assert item["status"] == "succeeded" and item["prediction"]["output"]
        assert "logs" not in item["prediction"] and "input" not in item["prediction"]  # slimmed


async def test_the_trigger_fires_at_the_hold_with_fewer_than_enough(sim):
    running = created(sim, 3, durations={FLUX: lambda model, input: 0.2 if input["prompt"] == "p1" else 60})
    started = time.monotonic()
    event = await asyncio.wait_for(first_event(PredictionBatchTrigger(running, enough=3, hold=1.0)), 20)
    assert [index for index, _ in event["ended"]] == [1]
    assert time.monotonic() - started < 10


async def test_the_trigger_ends_every_running_prediction_at_the_deadline(sim):
    running = created(sim, 3, never_finish=True)
    event = await asyncio.wait_for(first_event(PredictionBatchTrigger(running, enough=1, end_time=time.time() + 2)), 20)
    assert sorted(index for index, _ in event["ended"]) == [0, 1, 2]
    assert {item["status"] for _, item in event["ended"]} == {"timeout"}


async def test_the_trigger_fires_no_sooner_than_not_before_unless_the_deadline_comes_first(sim):
    # Enough ended at once, yet the event waits for not_before (Airflow's resume race), collecting what ends meanwhile.
    running = created(sim, 3, durations={FLUX: lambda model, input: {"p0": 0.1, "p1": 1.5}.get(input["prompt"], 60)})
    started = time.monotonic()
    trigger = PredictionBatchTrigger(running, enough=1, poll_interval=0.5, not_before=time.time() + 4)
    event = await asyncio.wait_for(first_event(trigger), 20)
    assert time.monotonic() - started >= 3.9
    assert [index for index, _ in event["ended"]] == [0, 1]
    # The batch's deadline lifts the floor: the running predictions time out at once.
    running = created(sim, 2, never_finish=True)
    started = time.monotonic()
    trigger = PredictionBatchTrigger(running, enough=1, end_time=time.time() + 2, not_before=time.time() + 60)
    event = await asyncio.wait_for(first_event(trigger), 30)
    assert {item["status"] for _, item in event["ended"]} == {"timeout"} and time.monotonic() - started < 15


def test_a_deferring_batch_asks_its_trigger_to_wait_out_the_resume_race(monkeypatch):
    from airflow_comet.batch_state import BatchState
    from airflow_comet.operators import batch

    monkeypatch.setattr(batch, "MIN_DEFERRAL", 10.0)
    operator = PredictionBatchOperator(task_id="b", model=FLUX, inputs=batch_inputs(), deferrable=True)
    state = BatchState(total=30, digest="x", started_at=time.time(), running=[[0, "id0", time.time(), 1]])
    trigger = operator._trigger(state)
    assert 9 < trigger.not_before - time.time() <= 10
    assert PredictionBatchTrigger(**trigger.serialize()[1]).not_before == trigger.not_before


async def test_the_trigger_reports_a_missing_connection_with_the_state(sim, monkeypatch):
    monkeypatch.setattr("airflow_comet.triggers.prediction.LOOKUP_PAUSES", (0.1,))
    event = await asyncio.wait_for(
        first_event(PredictionBatchTrigger([[0, "abc", time.time()]], cometapi_conn_id="nope", state={"version": 1})), 60
    )
    assert event["status"] == "error" and "nope" in event["message"] and event["state"] == {"version": 1}


class _StateBatchTrigger(PredictionBatchTrigger):
    """The task-state lookup needs a running API server; here the state is given."""

    state_of_task: str | None = None

    async def _task_state(self) -> str | None:
        return self.state_of_task


@pytest.mark.parametrize(("task_state", "cancelled"), [("failed", True), ("deferred", False), (None, False)])
async def test_the_triggers_on_kill_cancels_the_batch_only_when_the_task_stopped(sim, task_state, cancelled):
    running = created(sim, 3, never_finish=True)
    trigger = _StateBatchTrigger(running)
    trigger.state_of_task = task_state
    await trigger.on_kill()
    assert len(sim.cancels()) == (3 if cancelled else 0)


# -- the example DAG ------------------------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "dags_examples" / "comet_nightly_batch.py"


def test_the_nightly_example_writes_a_folder_per_run_with_the_manifest_beside_the_images(sim, monkeypatch, tmp_path):
    import importlib.util
    import sys

    sim.set_faults(Faults(durations=(0.3, 1.0), refused_words=("fox",)))
    monkeypatch.setenv("AIRFLOW_COMET_OUTPUT", tmp_path.as_uri())
    spec = importlib.util.spec_from_file_location("comet_nightly_batch_under_test", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)

    dr = run(module.dag)

    assert states(dr) == {"read_prompts": "success", "generate": "failed"}  # the fox is refused, twice
    (path,) = tmp_path.rglob("manifest.jsonl")
    assert path.parent != tmp_path  # a folder of its own for the run
    rows = manifest(path.parent)
    assert [row["status"] for row in rows] == ["succeeded", "succeeded", "failed", "succeeded"]
    assert rows[2]["attempts"] == 2 and "fox" in rows[2]["input"]["prompt"].lower()
    assert sorted(p.name for p in path.parent.glob("*.webp")) == sorted(
        f"{row['prediction_id']}-0.webp" for row in rows if row["status"] == "succeeded"
    )
    assert len(sim.creates()) == 5


def test_an_input_the_api_refuses_is_one_failed_row_and_not_created_again(sim):
    inputs = [{"prompt": "a boat"}, {"prompt": "a lighthouse", "aspect_ratio": "7:3"}, {"prompt": "a city"}]
    with dag("t_batch_bad_input") as d:
        PredictionBatchOperator(
            task_id="batch", model=FLUX, inputs=inputs, max_failures=1, item_retries=3, deferrable=False, poll_interval=2
        )
    dr = run(d)
    assert states(dr) == {"batch": "success"}
    rows = xcom(dr, "batch")
    assert [row["status"] for row in rows] == ["succeeded", "error", "succeeded"]
    assert rows[1]["prediction_id"] is None and "400" in rows[1]["error"] and rows[1]["attempts"] == 1
    assert sorted(r.status for r in sim.creates()) == [201, 201, 400]


def test_a_wrong_key_stops_the_batch_at_the_first_creates(sim, monkeypatch):
    from tests.conftest import set_connection

    set_connection(monkeypatch, sim.base_url, key="sk-wrong")
    with dag("t_batch_bad_key") as d:
        PredictionBatchOperator(
            task_id="batch", model=FLUX, inputs=batch_inputs(), max_in_flight=4, max_failures=100, item_retries=2,
            deferrable=True,
        )
    dr = run(d)
    assert states(dr) == {"batch": "failed"}  # whatever max_failures says: no item could ever run
    assert len(sim.creates()) == 4  # the first window, never retried, nothing after it
    rows = xcom(dr, "batch")
    assert [row["status"] for row in rows[:4]] == ["error"] * 4 and "key" in rows[0]["error"]
    assert {row["status"] for row in rows[4:]} == {"missing"}
    assert API_KEY not in json.dumps(rows) and "sk-wrong" not in json.dumps(rows)


# -- the ids kept for retries ---------------------------------------------------------------------------------


class DictStore:
    """The task state store's interface (get/set of JSON values), kept in a dict; counts the writes."""

    def __init__(self, data=None):
        self.data = dict(data or {})
        self.writes = 0

    def get(self, key, default=None):
        return json.loads(json.dumps(self.data[key])) if key in self.data else default

    def set(self, key, value):
        self.writes += 1
        self.data[key] = json.loads(json.dumps(value))


def test_the_ledger_keeps_every_items_id_across_chunks_and_runs():
    from airflow_comet.resume import BATCH_CHUNK, BatchLedger

    store = DictStore()
    first = BatchLedger({"task_state_store": store})
    for index in (0, 1, BATCH_CHUNK + 5):
        assert first.record(index, f"id{index}", f"fp{index}")
    # A later run of the task (after a deferral) records into the same chunk without dropping the others.
    assert BatchLedger({"task_state_store": store}).record(2, "id2", "fp2", attempts=3)
    assert BatchLedger({"task_state_store": store}).recall(BATCH_CHUNK + 10) == {
        0: ("id0", "fp0", 1), 1: ("id1", "fp1", 1), 2: ("id2", "fp2", 3),
        BATCH_CHUNK + 5: (f"id{BATCH_CHUNK + 5}", f"fp{BATCH_CHUNK + 5}", 1),
    }
    # An entry written before attempts were kept reads as one attempt.
    store.data["cometapi_batch.0"]["7"] = ["id7", "fp7"]
    assert BatchLedger({"task_state_store": store}).recall(8)[7] == ("id7", "fp7", 1)
    assert sorted(store.data) == ["cometapi_batch.0", "cometapi_batch.1"]
    assert not BatchLedger({}).supported and BatchLedger({}).recall(5) == {} and not BatchLedger({}).record(0, "x", "y")


async def test_an_earlier_id_is_reused_only_for_the_same_input(sim):
    from airflow_comet.batch_work import FINGERPRINT_CHARS, create_items
    from airflow_comet.hooks.cometapi import CometAPIHook
    from airflow_comet.resume import BatchLedger, fingerprint

    sim.set_faults(Faults(durations=60))
    earlier_id = CometAPIHook().create_prediction(FLUX, {"prompt": "same"})["id"]
    same = fingerprint("cometapi_default", FLUX, {"prompt": "same"})[:FINGERPRINT_CHARS]
    store = DictStore()
    hook = CometAPIHook()
    try:
        created = await create_items(
            hook, FLUX, [(0, 0, {"prompt": "same"}), (1, 0, {"prompt": "changed"})],
            ledger=BatchLedger({"task_state_store": store}), earlier={0: (earlier_id, same, 1), 1: (earlier_id, same, 1)},
            log=__import__("logging").getLogger("test"),
        )
    finally:
        await hook.aclose()
    assert created[0].prediction["id"] == earlier_id  # resumed, not created
    assert created[1].prediction["id"] != earlier_id  # its input changed: a new prediction
    assert len(sim.creates()) == 2  # the earlier one and item 1's
    assert store.data["cometapi_batch.0"]["1"][0] == created[1].prediction["id"]


async def test_an_earlier_trys_failed_prediction_is_its_outcome_and_a_cancelled_one_is_created_again(sim):
    """A task retry (a lost worker) must not pay again for an item CometAPI already failed (a refused prompt);
    ``item_retries`` decides that. A cancelled one (the batch's own deadline or on_kill) is created anew."""
    from airflow_comet.batch_work import FINGERPRINT_CHARS, create_items, settle
    from airflow_comet.hooks.cometapi import CometAPIHook
    from airflow_comet.resume import BatchLedger, fingerprint

    sim.set_faults(Faults(durations={FLUX: lambda model, input: 0.1 if "forbidden" in input["prompt"] else 60},
                          refused_words=["forbidden"]))
    inputs = [{"prompt": "a forbidden thing"}, {"prompt": "a cancelled thing"}]
    hook = CometAPIHook()
    refused, cancelled = (hook.create_prediction(FLUX, item)["id"] for item in inputs)
    hook.cancel_prediction(cancelled)
    for _ in range(100):
        if hook.get_prediction(refused)["status"] == "failed":
            break
        await asyncio.sleep(0.1)
    digests = [fingerprint("cometapi_default", FLUX, item)[:FINGERPRINT_CHARS] for item in inputs]
    async_hook = CometAPIHook()
    ledger = BatchLedger({"task_state_store": DictStore()})
    try:
        made = await create_items(
            async_hook, FLUX, [(0, 0, inputs[0]), (1, 0, inputs[1])],
            earlier={0: (refused, digests[0], 2), 1: (cancelled, digests[1], 1)}, ledger=ledger,
            log=__import__("logging").getLogger("test"),
        )
    finally:
        await async_hook.aclose()
    assert made[0].prediction["id"] == refused and made[0].prediction["status"] == "failed"
    assert made[1].prediction["id"] != cancelled
    assert len(sim.creates()) == 3  # the two earlier ones and item 1's new one
    # Attempts count per item across tries: the refused one had its two, the new one is item 1's second.
    assert [m.attempts for m in made] == [2, 2]
    assert ledger.recall(2)[1] == (made[1].prediction["id"], digests[1], 2)
    # With item_retries=1 the refused item, on its second attempt already, ends failed instead of a third create.
    state = BatchState(total=2, digest="x", started_at=time.time())
    event = {"status": "failed", "prediction_id": refused, "prediction": made[0].prediction, "message": "refused"}
    settle(state, [(0, made[0].attempts, event)], inputs, None, item_retries=1, cancel=None,
           log=__import__("logging").getLogger("test"), addresses=None)
    assert state.queue == [] and state.done[0][1] == "failed"


async def test_a_try_that_cannot_save_ids_stops_creating_and_cancels_what_it_could_not_save(sim):
    """Airflow 3.3.2 can start the next try while a resumed one still runs; the old try's writes then fail. It
    must create nothing more, and cancel a prediction whose id it could not save (no retry could find it)."""
    from airflow_comet.batch_work import create_items
    from airflow_comet.hooks.cometapi import CometAPIHook
    from airflow_comet.resume import BatchLedger

    class GoneTaskInstance(DictStore):
        def set(self, key, value):
            raise RuntimeError("API_SERVER_ERROR: 404 Task instance 01a2 not found")

    sim.set_faults(Faults(durations=60))
    ledger = BatchLedger({"task_state_store": GoneTaskInstance()})
    operator = PredictionBatchOperator(task_id="b", model=FLUX, inputs=batch_inputs(), max_in_flight=4)
    operator._async_hook = hook = CometAPIHook()
    state = BatchState(total=30, digest="x", started_at=time.time())
    try:
        assert await operator._fill(state, FLUX, batch_inputs(), ledger, {}) == []
        assert "task state store cannot be written" in state.halted and state.running == [] and sim.creates() == []
        # Written a moment ago, refused now: that create's prediction is cancelled and the batch stops.
        made = await create_items(hook, FLUX, [(3, 0, {"prompt": "x"})], ledger=ledger, earlier={},
                                  log=__import__("logging").getLogger("test"))
    finally:
        await hook.aclose()
    assert made[0].fatal and made[0].prediction is None and "was cancelled" in made[0].error
    assert len(sim.creates()) == 1 and [c.prediction_id for c in sim.cancels()] == [sim.creates()[0].prediction_id]
    assert BatchLedger({}).writable()  # no store (Airflow < 3.3): nothing to keep, creating goes on


@pytest.mark.parametrize("rate", [None, 2], ids=["sent_together", "queued_in_the_budget"])
async def test_a_long_retry_after_on_its_creates_defers_the_batch_instead_of_sleeping_in_its_worker(
    sim, monkeypatch, rate
):
    """A deferrable batch told to wait 30 s (429) puts the items back in front of its queue and defers until
    then; neither the create that got the 429 nor those held by the connection's pause sleep in the worker."""
    from airflow_comet.batch_state import BatchState
    from airflow_comet.hooks.cometapi import CometAPIHook
    from airflow_comet.resume import BatchLedger

    if rate:
        set_connection(monkeypatch, sim.base_url, max_requests_per_second=rate)
    sim.set_faults(Faults(durations=60, rate_limit_429=1, retry_after=30))
    operator = PredictionBatchOperator(task_id="b", model=FLUX, inputs=batch_inputs(), max_in_flight=4, deferrable=True)
    operator._async_hook = hook = CometAPIHook()
    state = BatchState(total=30, digest="x", started_at=time.time())
    started = time.monotonic()
    try:
        assert await operator._fill(state, FLUX, batch_inputs(), BatchLedger({}), {}) == []
    finally:
        await hook.aclose()
    assert time.monotonic() - started < 5  # told to wait 30 s: not slept here
    made = [r for r in sim.creates() if r.status < 300]
    assert [r.status for r in sim.creates()].count(429) == 1
    assert len(state.running) == len(made) == (3 if rate is None else 0)  # with a rate the others were queued
    waiting = [index for index, attempts in state.queue]
    assert waiting == sorted(waiting) and len(waiting) == 4 - len(made) and state.next == 4
    assert all(attempts == 0 for _, attempts in state.queue)  # nothing was created for them
    assert 28 <= operator._trigger(state).not_before - time.time() <= 31.5


class RecordingBatch(PredictionBatchOperator):
    """Notes each deferral: how many predictions its trigger follows, and how long it holds off at least."""

    deferrals: ClassVar[list[tuple[int, float]]] = []

    def defer(self, *, trigger, **kwargs):
        type(self).deferrals.append((len(trigger.running), trigger.not_before - time.time()))
        super().defer(trigger=trigger, **kwargs)


def test_a_deferrable_batch_through_a_429_storm_creates_each_item_once(sim, tmp_path):
    sim.set_faults(Faults(durations=0.5, rate_limit_429=1, retry_after=12))
    RecordingBatch.deferrals.clear()
    with dag("t_batch_429_defer") as d:
        RecordingBatch(
            task_id="batch", model=FLUX, inputs=batch_inputs(PROMPTS[:6]), max_in_flight=3,
            destination=f"file://{tmp_path}/", deferrable=True, poll_interval=1,
        )
    dr = run(d)
    assert states(dr) == {"batch": "success"}
    # The first deferral came with the 429'd item still to create (two of three running), holding off ~12 s:
    # the wait was not slept in the worker.
    running, holds_off = RecordingBatch.deferrals[0]
    assert running == 2 and 10.5 <= holds_off <= 13.5, RecordingBatch.deferrals
    made = [r for r in sim.creates() if r.status < 300]
    assert sorted(p["input"]["prompt"] for p in sim.predictions()) == sorted(PROMPTS[:6]) and len(made) == 6
    assert [r.status for r in sim.creates()].count(429) == 1
    assert [row["status"] for row in xcom(dr, "batch")] == ["succeeded"] * 6


def test_a_retried_batch_resumed_after_a_429_still_takes_the_earlier_trys_items_over(sim):
    """A retry whose first fill was cut short by a 429 defers before taking every item the earlier try made;
    on resume it must still find them in the task state store rather than pay for them again."""
    from airflow_comet.batch_work import FINGERPRINT_CHARS
    from airflow_comet.hooks.cometapi import CometAPIHook
    from airflow_comet.resume import BatchLedger, fingerprint
    from airflow_comet.batch_state import BatchState
    from airflow.providers.common.compat.sdk import TaskDeferred

    sim.set_faults(Faults(durations=60))
    inputs = batch_inputs(PROMPTS[:6])
    store = DictStore()
    ledger = BatchLedger({"task_state_store": store})
    hook = CometAPIHook()
    earlier = {}
    for index in range(4):  # the earlier try made items 0-3
        prediction_id = hook.create_prediction(FLUX, inputs[index])["id"]
        digest = fingerprint("cometapi_default", FLUX, dict(inputs[index]))[:FINGERPRINT_CHARS]
        assert ledger.record(index, prediction_id, digest)
        earlier[index] = prediction_id
    # This try took item 0, was told to wait (429) and deferred with it back in the queue.
    state = BatchState(total=6, digest=inputs_digest(inputs), started_at=time.time(), next=1, queue=[[0, 0]])
    operator = PredictionBatchOperator(task_id="b", model=FLUX, inputs=inputs, max_in_flight=4, deferrable=True)
    ti = _TaskInstance()
    ti.try_number = 2  # a retry: the earlier try's ids are read on resume
    context = {"ti": ti, "task_state_store": store}
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute_complete(context, {"status": "ended", "ended": [], "state": state.to_json()})
    followed = {row[0]: row[1] for row in deferred.value.trigger.running}
    assert followed == earlier  # resumed, each of them
    assert len(sim.creates()) == 4  # nothing created again


def test_a_batch_told_to_wait_round_after_round_stops_creating(sim, monkeypatch):
    from airflow_comet.batch_state import BatchState
    from airflow_comet.hooks.cometapi import CometAPIHook
    from airflow_comet.operators import batch
    from airflow_comet.resume import BatchLedger

    monkeypatch.setattr(batch, "MAX_CREATE_WAITS", 2)
    sim.set_faults(Faults(rate_limit_429=10, retry_after=30))
    operator = PredictionBatchOperator(task_id="b", model=FLUX, inputs=batch_inputs(), max_in_flight=1, deferrable=True)
    state = BatchState(total=30, digest="x", started_at=time.time(), end_time=time.time() + 5)

    async def fill():
        operator._async_hook = hook = CometAPIHook()
        try:
            return await operator._fill(state, FLUX, batch_inputs(), BatchLedger({}), {})
        finally:
            await hook.aclose()

    for _ in range(2):
        assert asyncio.run(fill()) == [] and state.halted is None and state.queue == [[0, 0]]
        # The trigger holds off for the 429's wait, but never past the batch's deadline.
        assert operator._trigger(state).not_before <= state.end_time
    asyncio.run(fill())
    assert "429" in state.halted and state.queue == [[0, 0]] and state.finished
    assert [r.status for r in sim.creates()] == [429, 429, 429]
