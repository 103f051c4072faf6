"""A nightly batch: every prompt of a file through one task, the images and a manifest in a folder per run.

Where the mapped pipeline (``comet_image_pipeline``) runs a create, a wait and a persist task per prompt, this
DAG runs the whole batch in one ``PredictionBatchOperator`` task: Airflow's cost per task instance is paid
once, not three times per prompt, and the waiting happens in the triggerer."""

from __future__ import annotations

import csv
import os
from datetime import datetime
from pathlib import Path

from airflow_comet.operators.batch import PredictionBatchOperator

try:
    from airflow.sdk import DAG, Param, task
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.decorators import task
    from airflow.models.param import Param

PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.csv"
MODEL = "black-forest-labs/flux-schnell"
#: Predictions running at CometAPI at once (CometAPI advises capping concurrency on the client). The deferred
#: task is resumed to persist and refill once a quarter of them ended: a larger window means fewer resumes.
MAX_IN_FLIGHT = 16
#: Prompts allowed to end without an image before the run is marked failed (image models refuse some).
MAX_FAILURES = 0
#: A prompt whose prediction failed (or was lost) is tried once more before it counts as a failure.
ITEM_RETRIES = 1
#: Read when the DAG is parsed; the ``output_dir`` param overrides it per run.
DEFAULT_OUTPUT_DIR = os.environ.get("AIRFLOW_COMET_OUTPUT") or "file:///tmp/airflow-comet-output"
#: One folder per run inside ``output_dir``, so a run's manifest never describes another run's images.
#: Made from the run id (a manual run has no logical date on Airflow 3), without ':' and '+'.
RUN_FOLDER = "{{ params.output_dir.rstrip('/') }}/{{ run_id | replace(':', '') | replace('+', '') }}/"

with DAG(
    dag_id="comet_nightly_batch",
    start_date=datetime(2026, 1, 1),
    schedule="@daily",
    catchup=False,
    max_active_runs=1,
    params={
        "output_dir": Param(
            DEFAULT_OUTPUT_DIR,
            type="string",
            description="Folder for the images: file:///..., s3://bucket/prefix or s3://conn_id@bucket/prefix.",
        ),
    },
    tags=["cometapi", "example", "batch"],
    doc_md=f"""
### Nightly batch

1. `read_prompts` reads `data/prompts.csv` (slug, prompt, aspect ratio) at run time and turns each row
   into a model input. (`inputs` also takes a `.jsonl` or `.csv` file directly, e.g.
   `s3://bucket/prompts/{{{{ ds }}}}.jsonl`, when its columns are the model's parameters.)
2. `generate` runs every prompt through `{MODEL}`, at most {MAX_IN_FLIGHT} at once, each created once. As
   each prediction ends its image is downloaded (streamed, size- and type-checked, no API key sent to the
   file host) into `<output_dir>/<run id>/` as `<prediction id>-<index>.webp`. A prompt whose prediction
   fails is tried {ITEM_RETRIES} more time(s).
3. When every prompt has ended, `generate` writes `manifest.jsonl` beside the images, one JSON line per
   prompt in file order: `index`, `input`, `status`, `error`, `prediction_id`, `model`, `predict_time`,
   `attempts` and `files` (`path`, `size`, `sha256`, `content_type`). The same rows are its XCom result.
   Only then does it fail the run, when more than {MAX_FAILURES} prompt(s) did not succeed.

The task log shows the batch's progress: `412/1000 succeeded, 3 failed, 64 running, 521 waiting; about
3 min left`.
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

    PredictionBatchOperator(
        task_id="generate",
        model=MODEL,
        inputs=read_prompts(),
        max_in_flight=MAX_IN_FLIGHT,
        destination=RUN_FOLDER,
        max_failures=MAX_FAILURES,
        item_retries=ITEM_RETRIES,
        deferrable=True,
        timeout=3 * 3600,
    )
