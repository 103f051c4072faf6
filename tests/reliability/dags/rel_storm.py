"""Scenario 6: a batch of mapped predictions (100 by default; the run's conf `n` changes it).

No pool: a create that CometAPI tells to wait longer than a few seconds waits in the triggerer, not in its
worker, so a long 429 storm holds no LocalExecutor worker (docs/reliability.md, scenario 6; limit 7 is gone).
"""

from __future__ import annotations

from datetime import timedelta

from rel_common import DAG, SCHNELL, START, Param

from airflow_comet.operators.prediction import CreatePredictionOperator

try:
    from airflow.sdk import task
except ImportError:  # Airflow 2
    from airflow.decorators import task

with DAG(
    dag_id="rel_storm",
    start_date=START,
    schedule=None,
    catchup=False,
    max_active_tasks=200,
    params={"n": Param(100, type="integer")},
    tags=["reliability"],
) as dag:

    @task
    def prompts(params=None) -> list[dict]:
        return [{"prompt": f"storm {i}", "seed": i, "output_format": "webp"} for i in range(int(params["n"]))]

    CreatePredictionOperator.partial(
        task_id="generate",
        model=SCHNELL,
        wait_for_completion=True,
        deferrable=True,
        poll_interval=10,
        timeout=900,
        # Airflow 3.3.2 sometimes fails a try that resumes very quickly after its trigger fired (the
        # executor's late "success" for the deferring run reaches the scheduler while the resumed run is
        # already running); the retry resumes the same prediction. A short delay keeps the test quick.
        retries=3,
        retry_delay=timedelta(seconds=5),
        max_active_tis_per_dag=200,
    ).expand(input=prompts())
