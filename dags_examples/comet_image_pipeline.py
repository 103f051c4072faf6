"""A data pipeline: prompts from a file, fanned out with dynamic task mapping, each waited on deferred,
the images saved to object storage with a manifest beside them.

A refused prompt never costs the others their images: the sensor and the persist step hand a failed
prediction on (``fail_on_error=False``) and every stage after ``create`` runs for the prompts that got
that far (``trigger_rule="all_done"``). The last task writes the manifest, then fails the run when more
than ``max_failures`` prompts did not succeed, so that the person on call notices."""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime
from pathlib import Path

from airflow_comet.manifest import pipeline_rows, raise_for_failures, summary, write_manifest
from airflow_comet.operators.persist import PersistPredictionOutputOperator
from airflow_comet.operators.prediction import CreatePredictionOperator
from airflow_comet.sensors.prediction import PredictionSensor

try:
    from airflow.sdk import DAG, Param, task
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.decorators import task
    from airflow.models.param import Param

PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.csv"
MODEL = "black-forest-labs/flux-schnell"
#: CometAPI advises capping concurrency on the client: at most this many creates run at once.
MAX_CONCURRENT_CREATES = 4
#: Read when the DAG is parsed; the ``output_dir`` param overrides it per run.
DEFAULT_OUTPUT_DIR = os.environ.get("AIRFLOW_COMET_OUTPUT") or "file:///tmp/airflow-comet-output"
#: One folder per run inside ``output_dir``, so a run's manifest never describes another run's images.
#: Made from the run id (a manual run has no logical date on Airflow 3), without ':' and '+'.
RUN_FOLDER = "{{ params.output_dir.rstrip('/') }}/{{ run_id | replace(':', '') | replace('+', '') }}/"

with DAG(
    dag_id="comet_image_pipeline",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    max_active_runs=1,
    params={
        "output_dir": Param(
            DEFAULT_OUTPUT_DIR,
            type="string",
            description="Folder for the images: file:///..., s3://bucket/prefix or s3://conn_id@bucket/prefix.",
        ),
        "prompts_file": Param(str(PROMPTS_FILE), type="string", description="CSV of prompts: slug,prompt,aspect_ratio."),
        "max_failures": Param(
            0, type="integer", minimum=0, description="Prompts that may fail before the run is marked failed."
        ),
    },
    tags=["cometapi", "example", "mapped"],
    doc_md=f"""
### Image pipeline

1. `read_prompts` reads the `prompts_file` param's CSV (slug, prompt, aspect ratio; default
   `data/prompts.csv`) at run time.
2. `create` is mapped over the rows: one `{MODEL}` prediction per prompt, at most
   {MAX_CONCURRENT_CREATES} at a time (`max_active_tis_per_dag`).
3. `wait` is mapped over the prediction ids and waits in the triggerer. A prediction that ends failed
   (a refused prompt) is handed on, not raised (`fail_on_error=False`).
4. `persist` is mapped over the finished predictions: it downloads every image (streamed, size- and
   type-checked, no API key sent to the file host) into `<output_dir>/<run id>/` as
   `<prediction id>-<index>.webp`, written atomically. A failed prediction persists nothing.
5. `manifest` writes `manifest.jsonl` in the same folder, one JSON line per prompt: `input`, `status`
   (`succeeded`, `failed`, `canceled`, or `missing` when its create or wait task failed), `error`,
   `prediction_id`, `model`, `predict_time` and `files` (`path`, `size`, `sha256`, `content_type`).
   It then fails the run when more than `max_failures` prompts did not succeed; the images that did
   succeed are saved either way.

`output_dir` is a DAG param (default `{DEFAULT_OUTPUT_DIR}`, taken from the environment variable
`AIRFLOW_COMET_OUTPUT` when the DAG is parsed). An S3 folder needs `apache-airflow-providers-amazon`
with `s3fs`; name its connection in the URL: `s3://aws_default@bucket/images`.
""",
) as dag:

    @task
    def read_prompts(params=None) -> list[dict]:
        """One model input per row of the prompts file."""
        path = Path(params["prompts_file"])
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise ValueError(f"{path} has no prompts")
        return [
            {"prompt": row["prompt"], "aspect_ratio": row.get("aspect_ratio") or "1:1", "output_format": "webp"}
            for row in rows
        ]

    # all_done: runs whatever the other prompts did, so the manifest always describes the whole run.
    @task(trigger_rule="all_done")
    def manifest(inputs: list[dict], predictions: list[dict], persisted: list[list[dict]], folder: str, params=None) -> str:
        """Write ``manifest.jsonl`` beside the images, then fail if too many prompts did not succeed."""
        rows = pipeline_rows(inputs, predictions, persisted)
        path = write_manifest(folder, rows)
        print(f"Wrote {path}: {summary(rows)}")
        raise_for_failures(rows, params["max_failures"], where=path)
        return path

    prompts = read_prompts()

    create = CreatePredictionOperator.partial(
        task_id="create",
        model=MODEL,
        max_active_tis_per_dag=MAX_CONCURRENT_CREATES,
    ).expand(input=prompts)

    wait = PredictionSensor.partial(
        task_id="wait", deferrable=True, timeout=900, fail_on_error=False, trigger_rule="all_done"
    ).expand(prediction_id=create.output)

    persist = PersistPredictionOutputOperator.partial(
        task_id="persist", destination=RUN_FOLDER, fail_on_error=False, trigger_rule="all_done"
    ).expand(prediction=wait.output)

    manifest(prompts, wait.output, persist.output, RUN_FOLDER)
