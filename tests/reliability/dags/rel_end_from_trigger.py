"""Mapped create-and-wait whose trigger ends each task itself (end_from_trigger): no second worker run; and a
sensor the scheduler starts in the triggerer (start_from_trigger) and its trigger ends: no worker run at all."""

from __future__ import annotations

from rel_common import DAG, SCHNELL, START, Param, task

from airflow_comet.operators.prediction import CreatePredictionOperator
from airflow_comet.sensors.prediction import PredictionSensor

with DAG(
    dag_id="rel_end_from_trigger",
    start_date=START,
    schedule=None,
    catchup=False,
    params={"prompts": Param(["a lighthouse"], type="array")},
    tags=["reliability"],
) as dag:

    @task
    def inputs(params=None) -> list[dict]:
        return [{"prompt": prompt} for prompt in params["prompts"]]

    CreatePredictionOperator.partial(
        task_id="generate",
        model=SCHNELL,
        wait_for_completion=True,
        deferrable=True,
        end_from_trigger=True,
        fail_on_error=False,
        poll_interval=5,
        timeout=600,
        retries=0,
    ).expand(input=inputs())

    create = CreatePredictionOperator(task_id="create", model=SCHNELL, input={"prompt": "a kite"}, retries=0)
    create >> PredictionSensor(
        task_id="wait",
        prediction_id="{{ ti.xcom_pull(task_ids='create', map_indexes=-1) }}",
        start_from_trigger=True,
        end_from_trigger=True,
        poke_interval=5,
        timeout=600,
        retries=0,
    )
