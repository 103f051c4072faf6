"""The DAGs of ``benchmarks/real_airflow.py``: one per sensor mode, the same batch of mapped predictions.

``bench_sensor_<mode>`` (mode: ``deferrable``, ``poke``, ``reschedule``) takes the batch from the run's conf
(``{"predictions": [{"model": ..., "input": {...}}, ...]}``, built by the benchmark script) and maps a task
group over it: per prediction a create-only ``CreatePredictionOperator`` (``wait_for_completion=False``: it
pushes the id and ends) and a ``PredictionSensor`` on that id. In a mapped task group ``wait[i]`` depends on
``create[i]`` alone, so each sensor can start as soon as its own prediction exists; ``weight_rule="upstream"``
gives the sensors (3) a higher priority than the creates (2), so the scheduler hands a ready sensor to the
executor before the next create: each sensor really waits for its prediction, instead of starting after the
last create, when most predictions would already be done. (LocalExecutor runs what it was handed in that
order, hence the creates' pool below.)

``COMET_BENCH_POKE_INTERVAL`` (environment, default 5 s) is every sensor's ``poke_interval``: the interval
between pokes in poke/reschedule mode, and the interval the deferred trigger backs off towards.
``COMET_BENCH_CREATE_POOL`` (default ``default_pool``) is the creates' pool: the benchmark makes it smaller than
``[core] parallelism``, as docs/reliability.md (limit 7) advises for LocalExecutor.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow_comet.operators.prediction import CreatePredictionOperator
from airflow_comet.sensors.prediction import PredictionSensor

try:
    from airflow.sdk import DAG, task, task_group
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.decorators import task, task_group

POKE_INTERVAL = float(os.environ.get("COMET_BENCH_POKE_INTERVAL", "5"))
CREATE_POOL = os.environ.get("COMET_BENCH_CREATE_POOL", "default_pool")
#: Sensor arguments per mode.
MODES = {
    "deferrable": {"deferrable": True},
    "poke": {"deferrable": False, "mode": "poke"},
    "reschedule": {"deferrable": False, "mode": "reschedule"},
}
#: Airflow 3.3.2 sometimes fails a try that resumes right after its trigger fired (see rel_storm.py); a
#: retry resumes the same prediction (the create's resume, or the sensor's id). The script counts retries.
RETRIES = {"retries": 3, "retry_delay": timedelta(seconds=5)}


def _bench_dag(mode: str) -> DAG:
    with DAG(
        dag_id=f"bench_sensor_{mode}",
        start_date=datetime(2026, 1, 1),
        schedule=None,
        catchup=False,
        max_active_runs=1,
        max_active_tasks=100_000,  # only [core] parallelism limits
        tags=["benchmark"],
    ) as dag:

        @task
        def predictions(dag_run=None) -> list[dict]:
            return list(dag_run.conf["predictions"])

        @task_group
        def prediction(model, input):
            create = CreatePredictionOperator(
                task_id="create",
                model=model,
                input=input,
                wait_for_completion=False,
                pool=CREATE_POOL,
                weight_rule="upstream",
                **RETRIES,
            )
            PredictionSensor(
                task_id="wait",
                prediction_id=create.output,
                poke_interval=POKE_INTERVAL,
                timeout=3600,
                weight_rule="upstream",
                **MODES[mode],
                **RETRIES,
            )

        prediction.expand_kwargs(predictions())
    return dag


for _mode in MODES:
    globals()[f"bench_sensor_{_mode}"] = _bench_dag(_mode)
