"""The smallest useful pipeline: create a flux-schnell prediction, then wait for it in the triggerer."""

from __future__ import annotations

from datetime import datetime

from airflow_comet.operators.prediction import CreatePredictionOperator
from airflow_comet.sensors.prediction import PredictionSensor

try:
    from airflow.sdk import DAG, Param
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.models.param import Param

with DAG(
    dag_id="comet_create_and_sense",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    params={"prompt": Param("A paper boat floating on calm water at sunrise", type="string")},
    tags=["cometapi", "example"],
    doc_md="""
### Create a prediction, then wait for it

`create` starts a `black-forest-labs/flux-schnell` prediction with the prompt from the run's
`prompt` param and pushes the prediction id to XCom. `wait` is a deferrable
`PredictionSensor`: it waits in the triggerer (no worker slot held) and returns the final
prediction object, whose `output` lists the image URLs (delivery URLs that expire: copy
them to your own storage).

Needs the `cometapi_default` connection (the key in its password field).
""",
) as dag:
    create = CreatePredictionOperator(
        task_id="create",
        model="black-forest-labs/flux-schnell",
        input={"prompt": "{{ params.prompt }}", "aspect_ratio": "1:1", "output_format": "webp"},
    )
    wait = PredictionSensor(task_id="wait", prediction_id=create.output, deferrable=True, timeout=600)
    create >> wait
