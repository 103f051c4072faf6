"""TaskFlow: ``@task.cometapi`` mapped over a few prompts, and a task that reads the predictions."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

try:
    from airflow.sdk import DAG, task
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.decorators import task

PROMPTS = [
    "A lighthouse in a storm, oil painting",
    "A paper boat on calm water at sunrise",
    "A red fox in fresh snow, watercolour",
]

with DAG(
    dag_id="comet_taskflow",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    tags=["cometapi", "example"],
    doc_md="""
### TaskFlow: `@task.cometapi`

`generate` returns the model input for one prompt; the decorator creates the prediction, waits
for it in the triggerer (`deferrable=True`) and returns the final prediction object. It is mapped
over the prompts: one prediction each. `image_urls` gets the predictions in prompt order. The
URLs expire: copy the files with `PersistPredictionOutputOperator` in a real pipeline.
""",
) as dag:

    @task.cometapi(
        model="black-forest-labs/flux-schnell",
        deferrable=True,
        timeout=600,
        retries=2,
        retry_delay=timedelta(seconds=5),
    )
    def generate(prompt: str) -> dict[str, Any]:
        return {"prompt": prompt, "aspect_ratio": "1:1", "output_format": "png"}

    @task
    def image_urls(predictions: list[dict[str, Any]]) -> list[str]:
        return [url for prediction in predictions for url in prediction["output"]]

    image_urls(generate.expand(prompt=PROMPTS))
