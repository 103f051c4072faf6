"""OpenLineage: the files the persist operator writes are output datasets, an input image read from a
path is an input dataset of the create, and the run carries the model and prediction id. Checked through
OpenLineage's own listener (file transport) in a real run, with the optional provider installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("airflow.providers.openlineage", reason="the openlineage extra is not installed")

from airflow_comet.lineage import dataset_for, prediction_lineage  # noqa: E402
from airflow_comet.testing.images import render_image  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "lineage_run.py"


@pytest.mark.parametrize(
    ("path", "namespace", "name"),
    [
        ("file:///data/images/abc-0.webp", "file", "/data/images/abc-0.webp"),
        ("/data/images/abc-0.webp", "file", "/data/images/abc-0.webp"),
        ("s3://my-bucket/images/2026-12-07/abc-0.webp", "s3://my-bucket", "images/2026-12-07/abc-0.webp"),
        ("s3://aws_default@my-bucket/images/abc-0.webp", "s3://my-bucket", "images/abc-0.webp"),
    ],
)
def test_datasets_are_named_as_the_openlineage_spec_says(path, namespace, name):
    dataset = dataset_for(path)
    assert (dataset.namespace, dataset.name) == (namespace, name)


def test_one_prediction_is_also_the_external_query():
    lineage = prediction_lineage(model="owner/model", prediction_ids=["p1"], outputs=["/a/p1-0.png"])
    assert lineage.run_facets["externalQuery"].externalQueryId == "p1"
    assert lineage.run_facets["cometapi_prediction"].model == "owner/model"
    many = prediction_lineage(model="owner/model", prediction_ids=["p1", "p2"])
    assert "externalQuery" not in many.run_facets and many.run_facets["cometapi_prediction"].predictionIds == ["p1", "p2"]


def test_a_real_run_reports_the_files_through_openlineage(tmp_path):
    source = tmp_path / "source.png"
    source.write_bytes(render_image("a boat", width=64, height=64, output_format="png"))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), str(source)], capture_output=True, text=True, timeout=300
    )
    assert "STATE success" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    complete = {e["job"]["name"].split(".")[-1]: e for e in events if e["eventType"] == "COMPLETE"}

    edit, persist = complete["edit"], complete["persist"]
    assert [(d["namespace"], d["name"]) for d in edit["inputs"]] == [("file", str(source))]
    (image,) = (tmp_path / "images").iterdir()
    assert [(d["namespace"], d["name"]) for d in persist["outputs"]] == [("file", str(image))]
    batch = complete["batch"]
    written = sorted((out := tmp_path / "batch").glob("*.webp"))
    assert len(written) == 2
    assert sorted((d["namespace"], d["name"]) for d in batch["outputs"]) == [("file", str(p)) for p in written]
    assert sorted(batch["run"]["facets"]["cometapi_prediction"]["predictionIds"]) == sorted(
        p.name.split("-")[0] for p in written
    )
    assert "externalQuery" not in batch["run"]["facets"]  # many predictions: no single external id
    assert out.joinpath("manifest.jsonl").is_file()
    for event in (edit, persist):
        facet = event["run"]["facets"]["cometapi_prediction"]
        assert facet["model"] == "black-forest-labs/flux-kontext-pro"
        assert facet["predictionIds"] == [image.name.split("-")[0]]
        assert event["run"]["facets"]["externalQuery"]["externalQueryId"] == image.name.split("-")[0]
