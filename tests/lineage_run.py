"""Run by tests/test_lineage.py in a process of its own: OpenLineage reads its transport when Airflow loads
its plugins, so the listener must be configured before Airflow is imported. Writes the events to a file."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path

out = Path(sys.argv[1])
source_image = sys.argv[2]
os.environ["AIRFLOW__OPENLINEAGE__TRANSPORT"] = json.dumps(
    {"type": "file", "log_file_path": str(out / "events.jsonl"), "append": True}
)
os.environ["AIRFLOW__OPENLINEAGE__NAMESPACE"] = "airflow-comet-test"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from airflow_comet.operators.batch import PredictionBatchOperator  # noqa: E402
from airflow_comet.operators.persist import PersistPredictionOutputOperator  # noqa: E402
from airflow_comet.operators.prediction import CreatePredictionOperator  # noqa: E402
from airflow_comet.testing import CometAPISimulator, Faults  # noqa: E402
from tests.dagrun import DAG, run  # noqa: E402

with CometAPISimulator(api_key="lineage-key", faults=Faults(durations=0.3)) as sim:
    os.environ["AIRFLOW_CONN_COMETAPI_DEFAULT"] = sim.connection_json()
    with DAG("t_lineage", start_date=datetime(2026, 1, 1), schedule=None) as dag:
        edit = CreatePredictionOperator(
            task_id="edit",
            model="black-forest-labs/flux-kontext-pro",
            input={"prompt": "make it night", "input_image": source_image, "output_format": "png"},
            wait_for_completion=True,
        )
        PersistPredictionOutputOperator(task_id="persist", prediction=edit.output, destination=(out / "images").as_uri())
        PredictionBatchOperator(
            task_id="batch",
            model="black-forest-labs/flux-schnell",
            inputs=[{"prompt": "a fox"}, {"prompt": "an owl"}],
            destination=(out / "batch").as_uri(),
        )
    dagrun = run(dag)
    print("STATE", getattr(dagrun.state, "value", dagrun.state))
