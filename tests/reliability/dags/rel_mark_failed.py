"""Scenario 1: two predictions deferred side by side; the test marks `victim` failed through the REST API."""

from __future__ import annotations

from rel_common import DAG, DEV, PRO, START

from airflow_comet.operators.prediction import CreatePredictionOperator

with DAG(dag_id="rel_mark_failed", start_date=START, schedule=None, catchup=False, tags=["reliability"]) as dag:
    for task_id, model in (("victim", PRO), ("bystander", DEV)):
        CreatePredictionOperator(
            task_id=task_id,
            model=model,
            input={"prompt": f"scenario 1: {task_id}", "output_format": "png"},
            wait_for_completion=True,
            deferrable=True,
            poll_interval=5,
            timeout=900,
            retries=0,
        )
