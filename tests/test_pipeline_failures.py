"""The example image pipeline with a refused prompt: every other image is saved, the manifest lists every
prompt with its outcome, and the run ends failed (its last task says why) unless max_failures allows it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.dagrun import run, states

EXAMPLE = Path(__file__).resolve().parent.parent / "dags_examples" / "comet_image_pipeline.py"


def _load_example(monkeypatch: pytest.MonkeyPatch, output: Path):
    """Import the example DAG file afresh, with its output folder (read at parse time) under ``output``."""
    monkeypatch.setenv("AIRFLOW_COMET_OUTPUT", output.as_uri())
    spec = importlib.util.spec_from_file_location("comet_image_pipeline_under_test", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module.dag


def _manifest(output: Path) -> list[dict]:
    (path,) = output.rglob("manifest.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("max_failures", [0, 1])
def test_a_refused_prompt_loses_no_other_image(sim, monkeypatch, tmp_path, max_failures):
    sim.set_faults(durations=(0.3, 1.0), refused_words=("fox",))
    dag = _load_example(monkeypatch, tmp_path)

    dagrun = run(dag, run_conf={"max_failures": max_failures})

    ti_states = states(dagrun)
    rows = _manifest(tmp_path)
    assert [row["index"] for row in rows] == [0, 1, 2, 3]
    assert [row["status"] for row in rows] == ["succeeded", "succeeded", "failed", "succeeded"]
    refused = rows[2]
    assert "fox" in refused["input"]["prompt"].lower()
    assert "NSFW" in refused["error"] and refused["files"] == []
    assert sim.prediction(refused["prediction_id"])["status"] == "failed"
    # Every succeeded prompt's image is on disk, with the sha256 the manifest gives.
    for row in (rows[0], rows[1], rows[3]):
        (written,) = row["files"]
        data = Path(written["path"].removeprefix("file://")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == written["sha256"]
        assert len(data) == written["size"] and written["content_type"] == "image/webp"
    assert len(list(tmp_path.rglob("*.webp"))) == 3
    # The refused prompt's wait and persist hand it on; only the manifest decides.
    assert ti_states["wait[2]"] == "success" and ti_states["persist[2]"] == "success"
    assert len(sim.creates()) == 4
    if max_failures == 0:
        assert ti_states["manifest"] == "failed"
        assert str(getattr(dagrun.state, "value", dagrun.state)) == "failed"
    else:
        assert ti_states["manifest"] == "success"
        assert str(getattr(dagrun.state, "value", dagrun.state)) == "success"


def test_a_prompt_refused_at_create_is_missing_and_the_others_are_saved(sim, monkeypatch, tmp_path):
    """A create that fails (here a 400 for a bad aspect ratio) leaves fewer waits; the rest still persist."""
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(
        "slug,prompt,aspect_ratio\n"
        "a,A paper boat,1:1\n"
        "b,A lighthouse,7:3\n"
        "c,A fox,1:1\n"
        "d,A city,16:9\n"
    )
    output = tmp_path / "out"
    dag = _load_example(monkeypatch, output)

    dagrun = run(dag, run_conf={"max_failures": 1, "prompts_file": str(prompts)})

    ti_states = states(dagrun)
    rows = _manifest(output)
    assert [row["status"] for row in rows] == ["succeeded", "missing", "succeeded", "succeeded"]
    assert rows[1]["input"]["prompt"] == "A lighthouse" and rows[1]["prediction_id"] is None
    assert [row["input"]["prompt"] for row in rows] == ["A paper boat", "A lighthouse", "A fox", "A city"]
    assert len(list(output.rglob("*.webp"))) == 3
    assert ti_states["create[1]"] == "failed"
    assert ti_states["manifest"] == "success"
