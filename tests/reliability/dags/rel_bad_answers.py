"""Scenario 7: four predictions at once, one per model; the test spoils the status answers of three models
(per-model faults) and keeps the fourth (`control`, flux-kontext-pro) healthy."""

from __future__ import annotations

from rel_common import DAG, DEV, KONTEXT, PRO, SCHNELL, START

from airflow_comet.operators.prediction import CreatePredictionOperator

MODELS = {"on_schnell": SCHNELL, "on_dev": DEV, "on_pro": PRO, "control": KONTEXT}

with DAG(dag_id="rel_bad_answers", start_date=START, schedule=None, catchup=False, tags=["reliability"]) as dag:
    for task_id, model in MODELS.items():
        CreatePredictionOperator(
            task_id=task_id,
            model=model,
            input={"prompt": f"scenario 7: {task_id}"},
            wait_for_completion=True,
            deferrable=True,
            # Bad answers back off up to poll_interval: 2 s keeps the ten-in-a-row bound at ~20 s.
            poll_interval=2,
            timeout=240,
            retries=0,
        )
