"""Scenario 5: predictions that never finish, bounded by the operator's `timeout` (the trigger's deadline)
and by `execution_timeout`."""

from __future__ import annotations

from datetime import timedelta

from rel_common import DAG, DEV, START

from airflow_comet.operators.prediction import CreatePredictionOperator

TRIGGER_DEADLINE = 20
EXECUTION_TIMEOUT = 25

with DAG(dag_id="rel_timeouts", start_date=START, schedule=None, catchup=False, tags=["reliability"]) as dag:
    CreatePredictionOperator(
        task_id="trigger_deadline",
        model=DEV,
        input={"prompt": "scenario 5: never finishes (timeout)"},
        wait_for_completion=True,
        deferrable=True,
        poll_interval=5,
        timeout=TRIGGER_DEADLINE,
        retries=0,
    )
    CreatePredictionOperator(
        task_id="execution_timeout",
        model=DEV,
        input={"prompt": "scenario 5: never finishes (execution_timeout)"},
        wait_for_completion=True,
        deferrable=True,
        poll_interval=5,
        timeout=None,
        execution_timeout=timedelta(seconds=EXECUTION_TIMEOUT),
        retries=0,
    )
