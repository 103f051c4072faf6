"""One task that creates a prediction and waits for it, deferred."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow_comet.operators.prediction import CreatePredictionOperator

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

with DAG(
    dag_id="comet_create_and_wait",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    tags=["cometapi", "example"],
    doc_md="""
### One task: create and wait

`CreatePredictionOperator` with `wait_for_completion=True` and `deferrable=True` starts the
prediction, then waits in the triggerer. Its `return_value` is the prediction id; the final
prediction object is under the XCom key `prediction`. On Airflow 3.3 a retry resumes the
prediction this task already started instead of paying for a new one.
""",
) as dag:
    CreatePredictionOperator(
        task_id="generate",
        model="black-forest-labs/flux-schnell",
        input={"prompt": "A lighthouse in a storm, oil painting", "aspect_ratio": "16:9", "output_format": "png"},
        wait_for_completion=True,
        deferrable=True,
        timeout=600,
        retries=2,
        retry_delay=timedelta(seconds=5),
    )
