"""Bad arguments fail with a message that names the problem: static ones when the DAG is parsed (the
operator is built), templated ones once rendered and before any request."""

from __future__ import annotations

import math

import pytest

from airflow_comet.operators.prediction import CreatePredictionOperator
from airflow_comet.sensors.prediction import PredictionSensor
from tests.dagrun import run, states
from tests.test_dags import FLUX, dag


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "flux-schnell"}, "owner/name"),
        ({"input": "a fox"}, "input must be a JSON object.*got str"),
        ({"input": {"prompt": "x", "seed": math.nan}}, r"input\['seed'\] is nan, which cannot be sent as JSON"),
        ({"input": {"prompt": "x", 3: "y"}}, "has a key 3 of type int; JSON keys are strings"),
        ({"input": {"prompt": object()}}, r"input\['prompt'\] is a object .*cannot be sent as JSON"),
        ({"prefer_wait": 61}, "prefer_wait must be a whole number of seconds from 1 to 60"),
        ({"poll_interval": 0}, "poll_interval must be positive"),
        ({"timeout": -1}, "timeout must be positive or None"),
    ],
)
def test_static_mistakes_fail_when_the_operator_is_built(kwargs, message):
    arguments = {"task_id": "gen", "model": FLUX, "input": {"prompt": "x"}, **kwargs}
    with pytest.raises(ValueError, match=message):
        CreatePredictionOperator(**arguments)


def test_templates_are_accepted_when_built_and_checked_once_rendered(sim):
    # Parse time cannot know what a template renders to: it is accepted then ...
    with dag("t_whole_input_template", params={"spec": {"prompt": "a fox"}}) as d:
        CreatePredictionOperator(task_id="gen", model="{{ 'black-forest-labs/flux-schnell' }}", input="{{ params.spec }}")
    # ... and, rendered to text (no render_template_as_native_obj), refused before any request, saying why.
    dr = run(d)
    assert states(dr) == {"gen": "failed"}
    assert sim.creates() == []
    with pytest.raises(ValueError, match="render_template_as_native_obj=True"):
        from airflow_comet.validation import validate_input

        validate_input("{'prompt': 'a fox'}")


def test_a_static_prediction_id_that_is_not_one_fails_when_the_sensor_is_built():
    with pytest.raises(ValueError, match="prediction"):
        PredictionSensor(task_id="wait", prediction_id="../../v1/models")


def test_a_whole_input_template_works_with_native_rendering(sim):
    with dag("t_whole_input_native", params={"spec": {"prompt": "a fox"}}, render_template_as_native_obj=True) as d:
        CreatePredictionOperator(task_id="gen", model=FLUX, input="{{ params.spec }}")
    dr = run(d)
    assert states(dr) == {"gen": "success"}
    [created] = sim.creates()
    assert sim.prediction(created.prediction_id)["input"] == {"prompt": "a fox"}
