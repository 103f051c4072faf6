"""Generate an image, save it, then edit the saved file with an image-editing model and save the edit."""

from __future__ import annotations

import os
from datetime import datetime

from airflow_comet.operators.persist import PersistPredictionOutputOperator
from airflow_comet.operators.prediction import CreatePredictionOperator

try:
    from airflow.sdk import DAG, Param
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.models.param import Param

GENERATE_MODEL = "black-forest-labs/flux-schnell"
EDIT_MODEL = "black-forest-labs/flux-kontext-pro"
#: Read when the DAG is parsed; the ``output_dir`` param overrides it per run.
DEFAULT_OUTPUT_DIR = os.environ.get("AIRFLOW_COMET_OUTPUT") or "file:///tmp/airflow-comet-output"
#: One folder per run inside ``output_dir`` (a manual run has no logical date on Airflow 3).
RUN_FOLDER = "{{ params.output_dir.rstrip('/') }}/edit-{{ run_id | replace(':', '') | replace('+', '') }}/"

with DAG(
    dag_id="comet_image_edit",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    params={
        "output_dir": Param(
            DEFAULT_OUTPUT_DIR,
            type="string",
            description="Folder for both images: file:///... (or s3://conn_id@bucket/prefix).",
        ),
        "prompt": Param("A paper boat on a calm lake at sunrise, watercolour", type="string"),
        "edit": Param("Make it night time, with a full moon and lanterns on the shore", type="string"),
    },
    tags=["cometapi", "example", "edit"],
    doc_md=f"""
### Generate, then edit the saved image

1. `generate` creates a `{GENERATE_MODEL}` prediction from the `prompt` param and waits for it (deferred).
2. `persist_original` saves it as `<output_dir>/edit-<run id>/<prediction id>-0.png`.
3. `edit` asks `{EDIT_MODEL}` to apply the `edit` param to that image. Its `input_image` is the saved
   file's path (`file:///...`): `CreatePredictionOperator` reads local files (and `ObjectStoragePath`
   values) given as `input_image`/`input_images` and sends them as `data:` URIs, so the edit does not
   depend on the output URL, which expires.
4. `persist_edit` saves the edited image in the same folder.

`output_dir` defaults to `{DEFAULT_OUTPUT_DIR}` (the environment variable `AIRFLOW_COMET_OUTPUT` when
the DAG is parsed).
""",
) as dag:
    generate = CreatePredictionOperator(
        task_id="generate",
        model=GENERATE_MODEL,
        input={"prompt": "{{ params.prompt }}", "aspect_ratio": "1:1", "output_format": "png"},
        wait_for_completion=True,
        deferrable=True,
        timeout=600,
    )

    # The create task's return value is the prediction id: persisting fetches the finished prediction.
    persist_original = PersistPredictionOutputOperator(
        task_id="persist_original", prediction=generate.output, destination=RUN_FOLDER
    )

    edit = CreatePredictionOperator(
        task_id="edit",
        model=EDIT_MODEL,
        input={
            "prompt": "{{ params.edit }}",
            # The path persist_original wrote; sent to CometAPI as a data: URI, not as a path.
            "input_image": "{{ ti.xcom_pull(task_ids='persist_original')[0]['path'] }}",
            "aspect_ratio": "match_input_image",
            "output_format": "png",
        },
        wait_for_completion=True,
        deferrable=True,
        timeout=900,
    )

    persist_edit = PersistPredictionOutputOperator(
        task_id="persist_edit", prediction=edit.output, destination=RUN_FOLDER
    )

    persist_original >> edit
