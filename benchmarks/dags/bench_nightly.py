"""The DAGs of ``benchmarks/real_airflow.py``'s nightly run: the same batch of predictions in three shapes.

Each takes its batch from the run's conf, built by the benchmark script: ``{"inputs": [{...}, ...],
"model": "owner/name", "destination": "file:///.../"}``, and saves every output file into ``destination``.

- ``bench_nightly_mapped`` (a): the example pipeline's shape (``dags_examples/comet_image_pipeline.py``), in a
  mapped task group per input: a create-only ``CreatePredictionOperator``, a deferrable ``PredictionSensor``
  and a ``PersistPredictionOutputOperator`` (failed predictions handed on, ``fail_on_error=False``). The
  task group (rather than three mapped tasks) lets each sensor start as soon as its own prediction exists,
  and ``weight_rule="upstream"`` ranks a ready sensor or persist before the next create, as in
  ``bench_sensor_modes.py``: the shape at its best on this deployment.
- ``bench_nightly_end_from_trigger`` (b): per input a ``CreatePredictionOperator(wait_for_completion=True,
  deferrable=True, end_from_trigger=True)``, whose trigger ends the task (no second worker run), then the
  persist task on its prediction id.
- ``bench_nightly_batch`` (c): one ``PredictionBatchOperator`` (``max_in_flight`` 64, the destination).

``COMET_BENCH_POLL_INTERVAL`` (environment, default 5 s) is every shape's longest gap between two status
checks; ``COMET_BENCH_CREATE_POOL`` (default ``default_pool``) the creates' pool of (a) and (b), smaller than
``[core] parallelism`` (docs/reliability.md, limit 7).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow_comet.operators.batch import PredictionBatchOperator
from airflow_comet.operators.persist import PersistPredictionOutputOperator
from airflow_comet.operators.prediction import CreatePredictionOperator
from airflow_comet.sensors.prediction import PredictionSensor

try:
    from airflow.sdk import DAG, task, task_group
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.decorators import task, task_group

POLL_INTERVAL = float(os.environ.get("COMET_BENCH_POLL_INTERVAL", "5"))
CREATE_POOL = os.environ.get("COMET_BENCH_CREATE_POOL", "default_pool")
MAX_IN_FLIGHT = 64
DESTINATION = "{{ dag_run.conf['destination'] }}"
MODEL = "{{ dag_run.conf['model'] }}"
#: Airflow 3.3.2 sometimes fails a try that resumes right after its trigger fired (see bench_sensor_modes.py);
#: a retry resumes the same prediction. The script counts retries and creates.
RETRIES = {"retries": 3, "retry_delay": timedelta(seconds=5)}


def _dag(dag_id: str, doc: str) -> DAG:
    return DAG(
        dag_id=dag_id,
        start_date=datetime(2026, 1, 1),
        schedule=None,
        catchup=False,
        max_active_runs=1,
        max_active_tasks=100_000,  # only [core] parallelism limits
        tags=["benchmark"],
        doc_md=doc,
    )


@task
def model_inputs(dag_run=None) -> list[dict]:
    """The batch's model inputs, from the run's conf."""
    return list(dag_run.conf["inputs"])


with _dag("bench_nightly_mapped", "(a) mapped create -> deferrable sensor -> persist") as bench_nightly_mapped:

    @task_group
    def prediction(input):
        create = CreatePredictionOperator(
            task_id="create", model=MODEL, input=input, pool=CREATE_POOL, weight_rule="upstream", **RETRIES
        )
        wait = PredictionSensor(
            task_id="wait", prediction_id=create.output, deferrable=True, poke_interval=POLL_INTERVAL,
            timeout=3600, fail_on_error=False, weight_rule="upstream", **RETRIES,
        )
        PersistPredictionOutputOperator(
            task_id="persist", prediction=wait.output, destination=DESTINATION, fail_on_error=False,
            weight_rule="upstream", **RETRIES,
        )

    prediction.expand(input=model_inputs())


with _dag(
    "bench_nightly_end_from_trigger", "(b) mapped create-and-wait, ended by its trigger -> persist"
) as bench_nightly_end_from_trigger:

    @task_group
    def prediction(input):
        create = CreatePredictionOperator(
            task_id="create", model=MODEL, input=input, wait_for_completion=True, deferrable=True,
            end_from_trigger=True, fail_on_error=False, poll_interval=POLL_INTERVAL, pool=CREATE_POOL,
            weight_rule="upstream", **RETRIES,
        )
        PersistPredictionOutputOperator(
            task_id="persist", prediction=create.output, destination=DESTINATION, fail_on_error=False,
            weight_rule="upstream", **RETRIES,
        )

    prediction.expand(input=model_inputs())


def _batch_dag(dag_id: str, doc: str, *, deferrable: bool) -> DAG:
    """(c) and (c'): the same PredictionBatchOperator, waiting in the triggerer or in its worker."""
    with _dag(dag_id, doc) as dag:
        PredictionBatchOperator(
            task_id="generate",
            model=MODEL,
            inputs=model_inputs(),
            max_in_flight=MAX_IN_FLIGHT,
            destination=DESTINATION,
            max_failures=1_000_000,  # the refused prompts are the workload's; the script counts them
            deferrable=deferrable,
            poll_interval=POLL_INTERVAL,
            timeout=3 * 3600,
            **RETRIES,
        )
    return dag


bench_nightly_batch = _batch_dag(
    "bench_nightly_batch", f"(c) one PredictionBatchOperator, {MAX_IN_FLIGHT} in flight", deferrable=True
)
bench_nightly_batch_worker = _batch_dag(
    "bench_nightly_batch_worker",
    f"(c') one PredictionBatchOperator waiting in its worker, {MAX_IN_FLIGHT} in flight",
    deferrable=False,
)
