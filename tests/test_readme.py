"""The DAG in README.md runs as written (its bucket swapped for a local folder): the first code a newcomer
copies must work, a refused prompt included."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.dagrun import AIRFLOW_3, run, states

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_dag_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (source,) = [block for block in blocks if "with DAG(" in block]
    return source


@pytest.mark.skipif(not AIRFLOW_3, reason="the README's DAG imports airflow.sdk (Airflow 3)")
def test_the_readme_dag_runs_and_keeps_the_images_of_a_run_with_a_refused_prompt(sim, tmp_path):
    sim.set_faults(durations=(0.3, 1.0), refused_words=("lighthouse",))
    source = _readme_dag_source()
    bucket = re.search(r'FOLDER = "(.*?)"', source).group(1)
    folder = tmp_path.as_uri() + "/{{ ds }}/"
    namespace: dict = {}
    exec(compile(source.replace(bucket, folder), str(README), "exec"), namespace)  # noqa: S102 - our README

    dagrun = run(namespace["dag"])

    assert states(dagrun) == {
        "create[0]": "success", "create[1]": "success", "wait[0]": "success", "wait[1]": "success",
        "persist[0]": "success", "persist[1]": "success", "manifest": "failed",
    }
    (manifest,) = tmp_path.rglob("manifest.jsonl")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [row["status"] for row in rows] == ["succeeded", "failed"]
    assert len(list(tmp_path.rglob("*.webp"))) == 1
