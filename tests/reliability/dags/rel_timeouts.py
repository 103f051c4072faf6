"""Scenario 5: predictions that never finish, bounded by the operator's `timeout` (the trigger's deadline)
and by `execution_timeout`; scenario 5b: `execution_timeout` passing while no triggerer runs."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from rel_common import DAG, DEV, START

from airflow_comet.operators.prediction import CreatePredictionOperator

TRIGGER_DEADLINE = 20
EXECUTION_TIMEOUT = 25
NO_TRIGGERER_EXECUTION_TIMEOUT = 8


def wait_deferred(task_id: str, prompt: str, **deadlines: Any) -> CreatePredictionOperator:
    """A create that waits in the triggerer (the simulator runs with never_finish in these scenarios)."""
    return CreatePredictionOperator(
        task_id=task_id,
        model=DEV,
        input={"prompt": prompt},
        wait_for_completion=True,
        deferrable=True,
        poll_interval=5,
        retries=0,
        **deadlines,
    )


with DAG(dag_id="rel_timeouts", start_date=START, schedule=None, catchup=False, tags=["reliability"]) as dag:
    wait_deferred("trigger_deadline", "scenario 5: never finishes (timeout)", timeout=TRIGGER_DEADLINE)
    wait_deferred(
        "execution_timeout",
        "scenario 5: never finishes (execution_timeout)",
        timeout=None,
        execution_timeout=timedelta(seconds=EXECUTION_TIMEOUT),
    )

# Airflow 2's scheduler fails the deferred task at its execution_timeout itself (next_method "__fail__",
# without the trigger's event) when no triggerer runs.
with DAG(dag_id="rel_timeouts_no_event", start_date=START, schedule=None, catchup=False, tags=["reliability"]) as dag_b:
    wait_deferred(
        "execution_timeout",
        "scenario 5b: never finishes, no triggerer",
        timeout=None,
        execution_timeout=timedelta(seconds=NO_TRIGGERER_EXECUTION_TIMEOUT),
    )
