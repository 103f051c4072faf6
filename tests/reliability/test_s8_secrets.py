"""Scenario 8: after every other scenario, the API key appears nowhere Airflow keeps things.

Searched: every file under AIRFLOW_HOME (task logs, trigger logs, the dag-processor's logs, the output of
every component: api-server, scheduler, dag-processor, each triggerer; on SQLite the database file itself);
the whole PostgreSQL metadata database (``pg_dump``: XComs, rendered template fields, trigger rows, task
state store, job and log tables); and, through the REST API, every task instance's rendered fields and the
XCom values of every task.
The key was really used (the simulator saw it on every request), so its absence means something.

Runs last (file order) on the shared deployment; run alone, it first runs one DAG so there is something to
search.
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import pytest

from tests.e2e.deployment import AirflowDeployment
from tests.reliability.common import VERSION, report
from tests.reliability.helpers import all_pages

pytestmark = [pytest.mark.e2e]


def test_api_key_appears_nowhere(basic_deployment: AirflowDeployment, request: pytest.FixtureRequest) -> None:
    dep = basic_deployment
    key = dep.config.api_key
    t0 = time.monotonic()
    dag_ids = [d["dag_id"] for d in all_pages(dep, "dags", "dags")]
    runs = [
        (dag_id, r["dag_run_id"])
        for dag_id in dag_ids
        for r in all_pages(dep, f"dags/{quote(dag_id)}/dagRuns", "dag_runs")
    ]
    if not runs:  # run alone: make something to search
        run, _ = dep.run_and_wait("rel_single", conf={"prompt": "scenario 8"}, timeout=120, watch=False)
        assert run["state"] == "success"
        runs = [("rel_single", run["dag_run_id"])]
    # The key was really sent (so its absence below means something).
    seen = [r for r in dep.simulator.requests() if r["server"] == "api"]
    assert all(r["headers"].get("Authorization") == f"Bearer {key}" for r in seen[:50])

    # 1. Files: task and trigger logs, every component's own output, and (SQLite) the database file.
    files = [p for p in dep.home.rglob("*") if p.is_file()]
    task_logs = [p for p in files if p.name.startswith("attempt=") and ".trigger." not in p.name]
    trigger_logs = [p for p in files if ".log.trigger." in p.name]
    leaked_files = [str(p) for p in dep.files_containing(key, files)]
    assert task_logs and trigger_logs
    assert not leaked_files, f"the API key appears in {leaked_files}"

    # 2. The metadata database, all of it (PostgreSQL: pg_dump; SQLite: its file was searched above).
    pg = getattr(dep, "postgres", None)
    dump = pg.dump() if pg is not None else ""
    if pg is not None:
        assert "COPY public.xcom" in dump and "COPY public.rendered_task_instance_fields" in dump
        assert key not in dump, "the API key is stored in the metadata database"

    # 3. What the REST API (and so the UI) shows: rendered template fields and XCom values of every task.
    tis = values = 0
    for dag_id, run_id in runs:
        run_path = f"dags/{quote(dag_id)}/dagRuns/{quote(run_id)}"
        for ti in all_pages(dep, f"{run_path}/taskInstances", "task_instances"):
            tis += 1
            assert key not in json.dumps(ti.get("rendered_fields")), ti
            map_index = int(ti.get("map_index", -1))
            if map_index > 2:  # the storm's hundred mapped copies look alike; the dump covered them all
                continue
            ti_path = f"{run_path}/taskInstances/{quote(ti['task_id'])}"
            for entry in all_pages(dep, f"{ti_path}/xcomEntries", "xcom_entries"):
                if int(entry.get("map_index", -1)) != map_index:
                    continue
                value = dep.api.request(
                    "GET",
                    f"{ti_path}/xcomEntries/{quote(entry['key'])}",
                    params={"map_index": map_index},
                    expect=(200, 400, 404),
                )
                assert key not in value.text, f"the API key is in XCom {entry}"
                values += 1
    assert values > 0
    report(
        request,
        8,
        airflow=".".join(map(str, VERSION)),
        outcome="API key found nowhere",
        runs=len(runs),
        files=len(files),
        task_logs=len(task_logs),
        trigger_logs=len(trigger_logs),
        db="pg_dump " + str(len(dump)) + " bytes" if pg is not None else "sqlite file",
        task_instances=tis,
        xcom_values_read=values,
        seconds=round(time.monotonic() - t0, 1),
    )
