"""Scenario: the example image pipeline on the real deployment, 20 prompts of which 2 are refused.

Promise: the 18 succeeded images are persisted with their sha256, ``manifest.jsonl`` lists all 20 prompts
with their outcomes (the refused ones ``failed`` with the API's error), and the run ends ``failed`` through
its last task (``max_failures`` 0), which names the refused predictions. One create per prompt.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from tests.e2e.deployment import AirflowDeployment
from tests.reliability.common import AIRFLOW33, needs_33, report
from tests.reliability.helpers import creates, fresh_simulator, start_run, task_error, task_instances

SKIP_REASON = needs_33("20 mapped prompts need the PostgreSQL/LocalExecutor deployment (3.3 only here)")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not AIRFLOW33, reason=SKIP_REASON)]

DAG_ID = "comet_image_pipeline"
PROMPTS = 20
REFUSED = (6, 15)


def test_two_refused_prompts_of_twenty_lose_no_other_image(
    rel_deployment: AirflowDeployment, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    dep = rel_deployment
    t0 = time.monotonic()
    sim = fresh_simulator(dep, durations=[2.0, 6.0], refused_words=["forbidden"])
    prompts = tmp_path / "prompts.csv"
    rows = [f"p{i},{'A forbidden' if i in REFUSED else 'A'} picture number {i},1:1" for i in range(PROMPTS)]
    prompts.write_text("slug,prompt,aspect_ratio\n" + "\n".join(rows) + "\n")
    output = tmp_path / "out"

    run_id = start_run(
        dep, DAG_ID, conf={"prompts_file": str(prompts), "output_dir": output.as_uri(), "max_failures": 0}
    )
    run = dep.wait_for_run(DAG_ID, run_id, timeout=600)

    assert run["state"] == "failed", dep.run_report(DAG_ID, run_id)
    states = {(ti["task_id"], ti["map_index"]): ti["state"] for ti in task_instances(dep, DAG_ID, run_id)}
    assert states[("manifest", -1)] == "failed", states
    failed_tasks = sorted(key for key, state in states.items() if state != "success" and key[0] != "manifest")
    assert failed_tasks == [], states
    assert len(creates(sim.requests())) == PROMPTS

    (manifest,) = output.rglob("manifest.jsonl")
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(PROMPTS))
    assert [i for i, line in enumerate(lines) if line["status"] != "succeeded"] == list(REFUSED)
    for i, line in enumerate(lines):
        assert line["input"]["prompt"].endswith(f"number {i}")
        if i in REFUSED:
            assert line["status"] == "failed" and "NSFW" in line["error"] and line["files"] == []
            continue
        (written,) = line["files"]
        data = Path(written["path"].removeprefix("file://")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == written["sha256"]
    assert len(list(output.rglob("*.webp"))) == PROMPTS - len(REFUSED)

    _, message = task_error(dep, DAG_ID, run_id, "manifest")
    refused_ids = [lines[i]["prediction_id"] for i in REFUSED]
    assert "2 of 20 predictions did not succeed" in message and all(pid in message for pid in refused_ids), message
    report(
        request,
        "refused prompts",
        outcome=f"run {run['state']}, manifest task {states[('manifest', -1)]}",
        creates=len(creates(sim.requests())),
        images=PROMPTS - len(REFUSED),
        manifest_lines=len(lines),
        seconds=round(time.monotonic() - t0, 1),
    )
