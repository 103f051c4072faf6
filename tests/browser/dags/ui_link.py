"""The DAG the browser test runs: one deferred create-and-wait, its prompt from the run's conf, no retries (a
refused prompt fails the run at once)."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_comet.operators.prediction import CreatePredictionOperator

with DAG(
    dag_id="ui_link",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    params={"prompt": Param("A lighthouse in a storm, oil painting", type="string")},
) as dag:
    CreatePredictionOperator(
        task_id="generate",
        model="black-forest-labs/flux-schnell",
        input={"prompt": "{{ params.prompt }}", "aspect_ratio": "1:1", "output_format": "png"},
        wait_for_completion=True,
        deferrable=True,
        poll_interval=1,
        timeout=120,
        retries=0,
    )
