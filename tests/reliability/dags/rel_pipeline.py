"""The example image pipeline itself (dags_examples/comet_image_pipeline.py) for the refused-prompts scenario;
Airflow's safe-mode DAG discovery reads a file only when it names both airflow and a DAG, as this line does."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "dags_examples"))

from comet_image_pipeline import dag  # noqa: E402,F401 - the DAG object is what the dag-processor collects
