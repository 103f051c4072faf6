"""One task that creates a prediction and waits for it in the triggerer (scenarios 2, 3 and 8)."""

from __future__ import annotations

from rel_common import DAG, SCHNELL, START, Param

from airflow_comet.operators.prediction import CreatePredictionOperator

with DAG(
    dag_id="rel_single",
    start_date=START,
    schedule=None,
    catchup=False,
    params={"model": Param(SCHNELL, type="string"), "prompt": Param("a lighthouse", type="string")},
    tags=["reliability"],
) as dag:
    CreatePredictionOperator(
        task_id="generate",
        model="{{ params.model }}",
        input={"prompt": "{{ params.prompt }}", "aspect_ratio": "1:1", "output_format": "webp"},
        wait_for_completion=True,
        deferrable=True,
        poll_interval=5,
        timeout=900,
        retries=0,
    )
