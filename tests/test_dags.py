"""Whole DAGs run for real with ``dag.test()`` against the simulator: XCom contract, failures, retries."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from airflow_comet.operators.prediction import CreatePredictionOperator
from airflow_comet.sensors.prediction import PredictionSensor
from airflow_comet.testing import Faults
from tests.conftest import API_KEY, set_connection
from tests.dagrun import DAG, run, states, xcom

FLUX = "black-forest-labs/flux-schnell"


def dag(dag_id: str, **kwargs) -> DAG:
    return DAG(dag_id, start_date=datetime(2026, 1, 1), schedule=None, catchup=False, **kwargs)


def test_create_then_deferrable_sensor(sim):
    with dag("t_create_sense") as d:
        create = CreatePredictionOperator(task_id="create", model=FLUX, input={"prompt": "a fox", "aspect_ratio": "1:1"})
        PredictionSensor(task_id="wait", prediction_id=create.output, deferrable=True, timeout=60)
    dr = run(d)
    assert states(dr) == {"create": "success", "wait": "success"}
    prediction_id = xcom(dr, "create")
    assert isinstance(prediction_id, str) and [r.prediction_id for r in sim.creates()] == [prediction_id]
    final = xcom(dr, "wait")
    assert final["id"] == prediction_id and final["status"] == "succeeded"
    assert final["output"] and all(url.startswith(sim.delivery_url) for url in final["output"])
    # The "CometAPI prediction" link is the first output file, once the prediction has succeeded: the sensor
    # knows it has; the create task, which did not wait, has no link.
    assert xcom(dr, "wait", "prediction_url") == final["output"][0]
    assert xcom(dr, "create", "prediction_url") is None


@pytest.mark.parametrize("mode", ["poke", "reschedule"])
def test_sensor_in_worker_modes(sim, mode):
    if mode == "reschedule":
        pytest.importorskip("airflow.sdk", reason="reschedule in dag.test() needs Airflow 3")
    with dag(f"t_sensor_{mode}") as d:
        create = CreatePredictionOperator(task_id="create", model=FLUX, input={"prompt": "a fox"})
        PredictionSensor(task_id="wait", prediction_id=create.output, mode=mode, poke_interval=0.5, timeout=60)
    dr = run(d)
    assert states(dr)["wait"] == "success"
    assert xcom(dr, "wait")["status"] == "succeeded"
    assert xcom(dr, "wait", "prediction_url") == xcom(dr, "wait")["output"][0]


@pytest.mark.parametrize("deferrable", [True, False])
def test_one_task_creates_and_waits(sim, deferrable):
    with dag(f"t_one_task_{deferrable}") as d:
        CreatePredictionOperator(
            task_id="gen", model=FLUX, input={"prompt": "a boat"}, wait_for_completion=True, deferrable=deferrable
        )
    dr = run(d)
    assert states(dr) == {"gen": "success"}
    prediction_id = xcom(dr, "gen")
    assert isinstance(prediction_id, str)
    assert xcom(dr, "gen", "prediction")["id"] == prediction_id
    assert xcom(dr, "gen", "prediction")["status"] == "succeeded"
    assert xcom(dr, "gen", "prediction_url") == xcom(dr, "gen", "prediction")["output"][0]
    assert len(sim.creates()) == 1


def test_failed_prediction_fails_the_task(sim):
    sim.set_faults(Faults(durations=0.3, fail_rate=1.0))
    with dag("t_failed") as d:
        create = CreatePredictionOperator(task_id="create", model=FLUX, input={"prompt": "x"})
        PredictionSensor(task_id="wait", prediction_id=create.output, deferrable=True, timeout=60)
    dr = run(d)
    assert states(dr) == {"create": "success", "wait": "failed"}
    assert xcom(dr, "wait") is None


@pytest.mark.parametrize("mode", ["deferrable", "poke"])
def test_fail_on_error_false_hands_a_failed_prediction_on(sim, mode):
    """The sensor, create-and-wait and persist succeed with a refused prompt's prediction as the result."""
    from airflow_comet.operators.persist import PersistPredictionOutputOperator

    sim.set_faults(Faults(durations=0.3, refused_words=("fox",)))
    deferrable = mode == "deferrable"
    with dag(f"t_fail_on_error_{mode}") as d:
        create = CreatePredictionOperator(task_id="create", model=FLUX, input={"prompt": "a fox"})
        wait = PredictionSensor(
            task_id="wait", prediction_id=create.output, deferrable=deferrable, poke_interval=0.5, timeout=60,
            fail_on_error=False,
        )
        PersistPredictionOutputOperator(
            task_id="persist", prediction=wait.output, destination="file:///tmp/unused", fail_on_error=False
        )
        CreatePredictionOperator(
            task_id="gen", model=FLUX, input={"prompt": "another fox"}, wait_for_completion=True,
            deferrable=deferrable, fail_on_error=False,
        )
    dr = run(d)
    assert states(dr) == {"create": "success", "wait": "success", "persist": "success", "gen": "success"}
    final = xcom(dr, "wait")
    assert final["id"] == xcom(dr, "create") and final["status"] == "failed" and "NSFW" in final["error"]
    assert xcom(dr, "persist") == []
    assert xcom(dr, "gen", "prediction")["status"] == "failed"
    # A failed prediction has no output to link to: no "CometAPI prediction" link.
    assert xcom(dr, "wait", "prediction_url") is None and xcom(dr, "gen", "prediction_url") is None


def test_bad_key_fails_create_without_retrying(sim, monkeypatch):
    set_connection(monkeypatch, sim.base_url, key="sk-wrong")
    with dag("t_bad_key") as d:
        CreatePredictionOperator(task_id="create", model=FLUX, input={"prompt": "x"})
    dr = run(d)
    assert states(dr) == {"create": "failed"}
    creates = sim.creates()
    assert len(creates) == 1 and creates[0].status == 401


def test_flaky_polling_still_one_create(sim):
    sim.set_faults(Faults(durations=3.0, poll_5xx_rate=0.5, rate_limit_429=2, retry_after=1))
    with dag("t_flaky") as d:
        CreatePredictionOperator(
            task_id="gen", model=FLUX, input={"prompt": "x"}, wait_for_completion=True, deferrable=True
        )
    dr = run(d)
    assert states(dr) == {"gen": "success"}
    created = [r for r in sim.creates() if r.status == 201]
    assert len(created) == 1
    assert any(r.status >= 429 for r in sim.requests)


def test_templated_input_renders_nested_jinja(sim):
    with dag("t_templated", params={"prompt": "a red lighthouse", "fmt": "png"}) as d:
        CreatePredictionOperator(
            task_id="create",
            model="{{ 'black-forest-labs' }}/flux-schnell",
            input={"prompt": "{{ params.prompt }}", "extra": {"format": "{{ params.fmt }}"}, "output_format": "png"},
        )
    dr = run(d)
    prediction = sim.prediction(xcom(dr, "create"))
    assert prediction["input"]["prompt"] == "a red lighthouse"
    assert prediction["input"]["extra"] == {"format": "png"}
    assert prediction["model"] == FLUX


def test_timeout_fails_and_cancels(sim):
    sim.set_faults(Faults(never_finish=True))
    with dag("t_timeout") as d:
        CreatePredictionOperator(
            task_id="gen", model=FLUX, input={"prompt": "x"}, wait_for_completion=True, deferrable=True, timeout=2
        )
    dr = run(d)
    assert states(dr) == {"gen": "failed"}
    [created] = sim.creates()
    assert len(sim.cancels(created.prediction_id)) == 1
    assert sim.prediction(created.prediction_id)["status"] == "canceled"


@pytest.mark.parametrize("soft_fail", [False, True])
@pytest.mark.parametrize("mode", ["poke", "deferrable"])
def test_sensor_timeout_cancels_the_prediction_and_honours_soft_fail(sim, mode, soft_fail):
    sim.set_faults(Faults(never_finish=True))
    waiting = {"mode": "poke", "poke_interval": 0.5} if mode == "poke" else {"deferrable": True}
    with dag(f"t_{mode}_timeout_{soft_fail}") as d:
        create = CreatePredictionOperator(task_id="create", model=FLUX, input={"prompt": "x"})
        PredictionSensor(task_id="wait", prediction_id=create.output, timeout=2, soft_fail=soft_fail, **waiting)
    dr = run(d)
    assert states(dr) == {"create": "success", "wait": "skipped" if soft_fail else "failed"}
    [created] = sim.creates()
    assert len(sim.cancels(created.prediction_id)) == 1
    assert sim.prediction(created.prediction_id)["status"] == "canceled"


def test_poke_mode_sensor_leaves_a_finished_prediction_alone(sim):
    sim.set_faults(Faults(durations=0.3, fail_rate=1.0))
    with dag("t_poke_failed") as d:
        create = CreatePredictionOperator(task_id="create", model=FLUX, input={"prompt": "x"})
        PredictionSensor(task_id="wait", prediction_id=create.output, mode="poke", poke_interval=0.5, timeout=30)
    dr = run(d)
    assert states(dr)["wait"] == "failed"
    [created] = sim.creates()
    assert sim.cancels(created.prediction_id) == []


def test_mapped_create_and_sense(sim):
    prompts = ["one", "two", "three"]
    with dag("t_mapped") as d:
        create = CreatePredictionOperator.partial(task_id="create", model=FLUX).expand(
            input=[{"prompt": p} for p in prompts]
        )
        PredictionSensor.partial(task_id="wait", deferrable=True, timeout=60).expand(prediction_id=create.output)
    dr = run(d)
    assert set(states(dr).values()) == {"success"}
    ids = [xcom(dr, "create", map_index=i) for i in range(3)]
    assert len(set(ids)) == 3 and len(sim.creates()) == 3
    assert sorted(sim.prediction(i)["input"]["prompt"] for i in ids) == sorted(prompts)
    assert [xcom(dr, "wait", map_index=i)["id"] for i in range(3)] == ids


def test_key_stays_out_of_xcom_and_rendered_fields(sim):
    with dag("t_secrets") as d:
        CreatePredictionOperator(
            task_id="gen", model=FLUX, input={"prompt": "x"}, wait_for_completion=True, deferrable=True
        )
    dr = run(d)
    for key in ("return_value", "prediction", "prediction_url"):
        assert API_KEY not in repr(xcom(dr, "gen", key))
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.utils.session import create_session

    with create_session() as session:
        rendered = RenderedTaskInstanceFields.get_templated_fields(dr.get_task_instance("gen", session=session), session=session)
    assert rendered and rendered["input"] == {"prompt": "x"}
    assert API_KEY not in repr(rendered)


def test_local_image_is_sent_as_a_data_uri(sim, tmp_path):
    from pathlib import Path

    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    with dag("t_file_input") as d:
        CreatePredictionOperator(
            task_id="edit",
            model="black-forest-labs/flux-kontext-pro",
            input={"prompt": "make it blue", "input_image": Path(image)},
            wait_for_completion=True,
        )
    dr = run(d)
    assert states(dr) == {"edit": "success"}
    sent = sim.prediction(xcom(dr, "edit"))["input"]["input_image"]
    assert sent.startswith("data:image/png;base64,")
    # XCom keeps the prediction small: the echoed data: URI is elided there.
    assert len(xcom(dr, "edit", "prediction")["input"]["input_image"]) < 200


class _TaskInstance:
    """What execute() needs of a task instance outside a run: somewhere to push XComs."""

    def __init__(self) -> None:
        self.pushed: dict[str, object] = {}

    def xcom_push(self, key: str, value: object) -> None:
        self.pushed[key] = value


def test_a_long_retry_after_on_create_waits_in_the_triggerer_not_the_worker(sim):
    """A 429 whose Retry-After is longer than a few seconds defers (TimeDeltaTrigger) instead of sleeping in
    the worker, then creates on resume: one prediction, and no worker slot held through a rate-limit storm."""
    from airflow.providers.common.compat.sdk import TaskDeferred

    sim.set_faults(Faults(durations=0.3, rate_limit_429=1, retry_after=30))
    operator = CreatePredictionOperator(task_id="c", model=FLUX, input={"prompt": "x"}, deferrable=True)
    ti = _TaskInstance()
    started = time.monotonic()
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute({"ti": ti})
    assert time.monotonic() - started < 5  # told to wait 30 s: not slept here
    assert deferred.value.method_name == "create_after_wait" and deferred.value.kwargs == {"create_waits": 1}
    from datetime import timezone

    waits = (deferred.value.trigger.moment - datetime.now(timezone.utc)).total_seconds()
    assert 28 <= waits <= 31.5
    assert sim.creates() == [] or all(r.status == 429 for r in sim.creates())

    prediction_id = operator.create_after_wait({"ti": ti}, event=None, create_waits=1)
    made = [r for r in sim.creates() if r.status < 300]
    assert [r.prediction_id for r in made] == [prediction_id]


def test_a_run_whose_create_waits_out_a_429_in_the_triggerer_creates_once(sim):
    sim.set_faults(Faults(durations=0.3, rate_limit_429=1, retry_after=6))
    with dag("t_429_defer") as d:
        CreatePredictionOperator(
            task_id="gen", model=FLUX, input={"prompt": "a boat"}, wait_for_completion=True, deferrable=True
        )
    dr = run(d)
    assert states(dr) == {"gen": "success"}
    made = [r for r in sim.creates() if r.status < 300]
    assert [r.prediction_id for r in made] == [xcom(dr, "gen")]
    assert [r.status for r in sim.creates()][0] == 429
