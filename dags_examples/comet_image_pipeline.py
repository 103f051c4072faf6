"""A data pipeline: prompts from a file, fanned out with dynamic task mapping, each waited on deferred,
the images saved to object storage with a manifest beside them."""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime
from pathlib import Path

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
        )
    },
    tags=["cometapi", "example", "mapped"],
    doc_md=f"""
### Image pipeline

1. `read_prompts` reads `data/prompts.csv` (slug, prompt, aspect ratio) at run time.
2. `create` is mapped over the rows: one `{MODEL}` prediction per prompt, at most
   {MAX_CONCURRENT_CREATES} at a time (`max_active_tis_per_dag`).
3. `wait` is mapped over the prediction ids and waits in the triggerer.
4. `persist` is mapped over the finished predictions: it downloads every image (streamed, size- and
   type-checked, no API key sent to the file host) into `<output_dir>/<run id>/` as
   `<prediction id>-<index>.webp`, written atomically.
5. `write_manifest` writes `manifest.jsonl` in the same folder: one JSON line per prediction with
   `prompt`, `prediction_id`, `model`, `files` (paths), `sha256` (one per file, same order) and
   `predict_time` (seconds, from the prediction's `metrics`). Its return value is the manifest's path.

`output_dir` is a DAG param (default `{DEFAULT_OUTPUT_DIR}`, taken from the environment variable
`AIRFLOW_COMET_OUTPUT` when the DAG is parsed). An S3 folder needs `apache-airflow-providers-amazon`
with `s3fs`; name its connection in the URL: `s3://aws_default@bucket/images`.
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

    @task
    def write_manifest(inputs: list[dict], predictions: list[dict], persisted: list[list[dict]], folder: str) -> str:
        """Write ``manifest.jsonl`` beside the images (atomically) and return its path."""
        from airflow_comet.output_files import StagedFile, destination_folder

        if not len(inputs) == len(predictions) == len(persisted):
            raise ValueError(
                f"{len(inputs)} prompts, {len(predictions)} predictions and {len(persisted)} persisted: "
                "the mapped tasks should match one to one"
            )
        lines = []
        # Mapped results come back in map-index order, so the i-th of each list belong together. zip()
        # stops at the first list's end without reading past the others (which Airflow 3 logs as an error).
        for model_input, prediction, records in zip(inputs, predictions, persisted):
            if any(record["prediction_id"] != prediction["id"] for record in records):
                raise ValueError(f"persisted files {records} do not belong to prediction {prediction['id']}")
            written = sorted(records, key=lambda record: record["index"])
            line = {
                "prompt": model_input["prompt"],
                "prediction_id": prediction["id"],
                "model": prediction.get("model") or MODEL,
                "files": [record["path"] for record in written],
                "sha256": [record["sha256"] for record in written],
                "predict_time": (prediction.get("metrics") or {}).get("predict_time"),
            }
            lines.append(json.dumps(line, ensure_ascii=False))
        with StagedFile(destination_folder(folder), "manifest") as staged:
            staged.open("jsonl").write(("\n".join(lines) + "\n").encode("utf-8"))
            path = staged.publish()
        print(f"Wrote {len(lines)} predictions to {path}")
        return str(path)

    prompts = read_prompts()

    create = CreatePredictionOperator.partial(
        task_id="create",
        model=MODEL,
        max_active_tis_per_dag=MAX_CONCURRENT_CREATES,
    ).expand(input=prompts)

    wait = PredictionSensor.partial(task_id="wait", deferrable=True, timeout=900).expand(
        prediction_id=create.output
    )

    persist = PersistPredictionOutputOperator.partial(task_id="persist", destination=RUN_FOLDER).expand(
        prediction=wait.output
    )

    write_manifest(prompts, wait.output, persist.output, RUN_FOLDER)
