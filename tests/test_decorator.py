"""``@task.cometapi`` run for real with ``dag.test()`` against the simulator, on Airflow 2.11 and 3.3."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from airflow_comet.decorators.cometapi import _CometAPIDecoratedOperator, cometapi_task
from airflow_comet.get_provider_info import get_provider_info
from airflow_comet.testing import Faults
from tests.dagrun import AIRFLOW_3_3, run, states, task, xcom
from tests.test_dags import FLUX, dag

EXAMPLE = Path(__file__).resolve().parent.parent / "dags_examples" / "comet_taskflow.py"


def test_task_cometapi_resolves_through_the_provider_info():
    assert {"name": "cometapi", "class-name": "airflow_comet.decorators.cometapi.cometapi_task"} in (
        get_provider_info()["task-decorators"]
    )
    # ``from airflow.sdk import task`` on 3.x, ``from airflow.decorators import task`` on 2.x.
    assert task.cometapi is cometapi_task


@pytest.mark.parametrize("deferrable", [True, False])
def test_a_task_returns_the_final_prediction(sim, tmp_path, deferrable):
    calls = tmp_path / "calls"

    with dag(f"t_deco_{deferrable}", params={"subject": "a fox"}) as d:

        @task.cometapi(model=FLUX, deferrable=deferrable, poll_interval=1)
        def gen(params: Any = None) -> dict[str, Any]:
            with calls.open("a") as f:  # a file: the task may run in another process
                f.write("called\n")
            return {"prompt": f"{params['subject']}, oil painting", "aspect_ratio": "1:1"}

        gen()

    dr = run(d)
    assert states(dr) == {"gen": "success"}
    prediction = xcom(dr, "gen")
    [create] = sim.creates()
    assert prediction["id"] == create.prediction_id and prediction["status"] == "succeeded"
    assert prediction["output"] and all(url.startswith(sim.delivery_url) for url in prediction["output"])
    assert sim.prediction(prediction["id"])["input"] == {"prompt": "a fox, oil painting", "aspect_ratio": "1:1"}
    # The dict annotation does not unroll the prediction into one XCom per key.
    assert xcom(dr, "gen", "status") is None
    # The operator's other XComs are there as usual: the link (the first output file), and the prediction id
    # pushed before deferring.
    assert xcom(dr, "gen", "prediction_url") == prediction["output"][0]
    assert xcom(dr, "gen", "deferred_prediction_id") == (prediction["id"] if deferrable else None)
    # The resume from deferral went to execute_complete: the function ran once.
    assert calls.read_text() == "called\n"
    if AIRFLOW_3_3:  # Airflow 3 stores the rendered fields again at the end: the UI shows the real input
        assert rendered_input(dr, "gen") == {"prompt": "a fox, oil painting", "aspect_ratio": "1:1"}


def rendered_input(dagrun: Any, task_id: str) -> Any:
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = dagrun.get_task_instance(task_id, session=session)
        return RenderedTaskInstanceFields.get_templated_fields(ti, session=session)["input"]


def test_multiple_outputs_pushes_each_key_of_the_prediction(sim):
    with dag("t_deco_multiple") as d:

        @task.cometapi(model=FLUX, deferrable=False, poll_interval=1, multiple_outputs=True)
        def gen() -> dict[str, Any]:
            return {"prompt": "x"}

        gen()

    dr = run(d)
    prediction = xcom(dr, "gen")
    assert prediction["status"] == "succeeded"
    assert xcom(dr, "gen", "status") == "succeeded" and xcom(dr, "gen", "output") == prediction["output"]


def test_mapped_over_prompts(sim):
    prompts = ["one", "two", "three", "four"]
    with dag("t_deco_mapped") as d:

        @task.cometapi(model=FLUX, deferrable=True, poll_interval=1)
        def gen(prompt: str) -> dict[str, Any]:
            return {"prompt": prompt}

        @task
        def collect(predictions: Any) -> list[str]:
            return [p["input"]["prompt"] for p in predictions]

        collect(gen.expand(prompt=prompts))

    dr = run(d)
    assert set(states(dr).values()) == {"success"}
    results = [xcom(dr, "gen", map_index=i) for i in range(len(prompts))]
    assert [r["input"]["prompt"] for r in results] == prompts
    assert xcom(dr, "collect") == prompts
    # One create per prompt, each for its own prompt.
    creates = sim.creates()
    assert len(creates) == len(prompts)
    assert sorted(r.prediction_id for r in creates) == sorted(r["id"] for r in results)
    assert [sim.prediction(r["id"])["input"]["prompt"] for r in results] == prompts


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("a red fox", TypeError, r"function gen\(\) must return the model input as a dict.*returned str: 'a red fox'"),
        ([{"prompt": "x"}], TypeError, r"returned list"),
        (None, TypeError, r"returned NoneType"),
        ({"prompt": object()}, ValueError, r"gen\(\) returned an unusable model input: input\['prompt'\] is a object"),
        ({1: "x"}, ValueError, r"has a key 1 of type int"),
    ],
)
def test_a_bad_return_value_is_a_clear_error(value, error, match):
    with dag("t_deco_bad_unit"):

        @task.cometapi(model=FLUX)
        def gen() -> Any:
            return value

        operator = gen().operator
    with pytest.raises(error, match=match):
        operator.execute({})


def test_a_bad_return_value_fails_the_task_before_any_create(sim):
    with dag("t_deco_bad") as d:

        @task.cometapi(model=FLUX)
        def gen() -> Any:
            return "a red fox"

        gen()

    dr = run(d)
    assert states(dr) == {"gen": "failed"}
    assert sim.creates() == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "flux-schnell"}, ValueError, "owner/name"),
        ({"model": FLUX, "prefer_wait": 90}, ValueError, "prefer_wait"),
        ({"model": FLUX, "input": {"prompt": "x"}}, TypeError, "drop input="),
        ({"model": FLUX, "wait_for_completion": False}, ValueError, "always waits"),
    ],
)
def test_static_bad_parameters_fail_when_the_dag_is_parsed(kwargs, error, match):
    # Raised where the decorator is applied, so a mapped task (built only at run time) is covered too.
    with pytest.raises(error, match=match):

        @task.cometapi(**kwargs)
        def gen(prompt: str) -> dict[str, Any]:
            return {"prompt": prompt}


def test_a_bad_poll_interval_fails_at_parse_time_like_the_operator():
    with dag("t_deco_poll"), pytest.raises(ValueError, match="poll_interval must be positive"):

        @task.cometapi(model=FLUX, poll_interval=0)
        def gen() -> dict[str, Any]:
            return {"prompt": "x"}

        gen()


def test_a_failed_prediction_fails_the_task(sim):
    sim.set_faults(Faults(durations=0.3, fail_rate=1.0))
    with dag("t_deco_failed") as d:

        @task.cometapi(model=FLUX, deferrable=True, poll_interval=1)
        def gen() -> dict[str, Any]:
            return {"prompt": "x"}

        gen()

    dr = run(d)
    assert states(dr) == {"gen": "failed"}
    assert xcom(dr, "gen") is None
    assert len(sim.creates()) == 1


def test_a_returned_file_path_is_sent_as_a_data_uri(sim, tmp_path):
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    with dag("t_deco_file") as d:

        @task.cometapi(model="black-forest-labs/flux-kontext-pro", deferrable=False, poll_interval=1)
        def edit() -> dict[str, Any]:
            return {"prompt": "make it blue", "input_image": image}

        edit()

    dr = run(d)
    assert states(dr) == {"edit": "success"}
    assert sim.prediction(xcom(dr, "edit")["id"])["input"]["input_image"].startswith("data:image/png;base64,")


class _WorkerLostAfterCreate(_CometAPIDecoratedOperator):
    """Fails its first try right after the create, as a worker killed between create and wait would."""

    def _wait_in_worker(self, prediction: dict[str, Any], end_time: float | None) -> dict[str, Any]:
        if self._first_try:
            raise RuntimeError("worker lost")
        return super()._wait_in_worker(prediction, end_time)

    def execute(self, context: Any) -> Any:
        self._first_try = context["ti"].try_number == 1
        return super().execute(context)


def test_a_retry_runs_the_function_again_and_resumes_the_prediction(sim):
    from airflow.providers.common.compat.sdk import task_decorator_factory

    sim.set_faults(Faults(durations=3.0))
    with dag("t_deco_retry") as d:

        @task_decorator_factory(
            decorated_operator_class=_WorkerLostAfterCreate,
            multiple_outputs=False,
            model=FLUX,
            deferrable=False,
            poll_interval=1,
            retries=1,
            retry_delay=timedelta(seconds=0),
        )
        def gen() -> dict[str, Any]:
            return {"prompt": "x"}

        gen()

    dr = run(d)
    assert states(dr) == {"gen": "success"}
    assert dr.get_task_instance("gen").try_number == 2
    if AIRFLOW_3_3:  # the task state store carries the id to the retry: one prediction paid for
        [create] = sim.creates()
        assert xcom(dr, "gen")["id"] == create.prediction_id
    else:  # no store before 3.3: the retry creates again (README, Reliability, limit 3)
        assert len(sim.creates()) == 2


def test_the_example_dag_runs(sim):
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 2
        from airflow.models.dagbag import DagBag

    bag = DagBag(str(EXAMPLE))
    assert not bag.import_errors
    example = bag.dags["comet_taskflow"]
    dr = run(example)
    assert set(states(dr).values()) == {"success"}
    assert len(sim.creates()) == 3
