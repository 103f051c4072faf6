"""A data pipeline: prompts from a file, fanned out with dynamic task mapping, each waited on deferred."""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

from airflow_comet.operators.prediction import CreatePredictionOperator
from airflow_comet.sensors.prediction import PredictionSensor

try:
    from airflow.sdk import DAG, task
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.decorators import task

PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.csv"
#: CometAPI advises capping concurrency on the client: at most this many creates run at once.
MAX_CONCURRENT_CREATES = 4

with DAG(
    dag_id="comet_image_pipeline",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    max_active_runs=1,
    tags=["cometapi", "example", "mapped"],
    doc_md=f"""
### Image pipeline

1. `read_prompts` reads `data/prompts.csv` (slug, prompt, aspect ratio) at run time.
2. `create` is mapped over the rows: one flux-schnell prediction per prompt, at most
   {MAX_CONCURRENT_CREATES} at a time (`max_active_tis_per_dag`).
3. `wait` is mapped over the prediction ids and waits in the triggerer.
""",
) as dag:

    @task
    def read_prompts() -> list[dict]:
        """One model input per row of the prompts file."""
        with PROMPTS_FILE.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise ValueError(f"{PROMPTS_FILE} has no prompts")
        return [
            {"prompt": row["prompt"], "aspect_ratio": row.get("aspect_ratio") or "1:1", "output_format": "webp"}
            for row in rows
        ]

    create = CreatePredictionOperator.partial(
        task_id="create",
        model="black-forest-labs/flux-schnell",
        max_active_tis_per_dag=MAX_CONCURRENT_CREATES,
    ).expand(input=read_prompts())

    wait = PredictionSensor.partial(task_id="wait", deferrable=True, timeout=900).expand(
        prediction_id=create.output
    )
