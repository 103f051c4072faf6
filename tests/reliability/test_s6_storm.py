"""Scenario 6: a storm on a batch of mapped predictions.

100 mapped ``CreatePredictionOperator`` tasks (``rel_storm``; ``RELIABILITY_STORM_SIZE`` changes the count)
wait deferred in two triggerers. Random 5xx answer a fifth of the status checks for the whole run, and once
30 % of the predictions exist every API request (creates and polls) is answered 429 with ``Retry-After: 10``
for 60 s.

No pool: a create told to wait longer than a few seconds defers and waits in the triggerer. Before that,
every LocalExecutor worker was held by a create sleeping out the storm, Airflow 3.3.2's scheduler stalled
66 s, declared itself dead and reset its running tasks, and four of those had cancelled their prediction
(on_kill) and paid for a new one on retry: 104 creates for 100, unless the creates ran in a small pool.

Promise: every task succeeds, exactly one create per prediction asked for (a 429 creates nothing, and a
create is only retried when it cannot have reached the server), and no hot loop: the status requests per
prediction stay bounded (printed) and so do the requests per second.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter

import pytest

from tests.e2e.deployment import AirflowDeployment
from tests.reliability.common import AIRFLOW33, needs_33, report
from tests.reliability.helpers import (
    cancels,
    creates,
    fresh_simulator,
    live_triggerers,
    poll_figures,
    start_run,
    task_instances,
    wait,
)

SKIP_REASON = needs_33(
    "100 mapped tasks need the PostgreSQL/LocalExecutor deployment (3.3 only here); 2.11 on SQLite runs tasks one at a time"
)
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not AIRFLOW33, reason=SKIP_REASON)]

DAG_ID = "rel_storm"
SIZE = int(os.environ.get("RELIABILITY_STORM_SIZE", "100"))
STORM_SECONDS = 60
RETRY_AFTER = 10
BASE_FAULTS = {"durations": [2.0, 6.0], "poll_5xx_rate": 0.2}
#: A 2-6 s prediction polls 2-4 times when all is well; the storm adds a retry every Retry-After (10 s)
#: for 60 s at most. Far more than this would be a hot loop.
MAX_POLLS_PER_PREDICTION = 25


def test_storm_of_429s_and_5xx_on_100_mapped_predictions(
    rel_deployment: AirflowDeployment, request: pytest.FixtureRequest
) -> None:
    dep = rel_deployment
    assert len(live_triggerers(dep)) == 2
    t0 = time.monotonic()
    sim = fresh_simulator(dep, **BASE_FAULTS)
    scheduler_log = dep.components["scheduler-0"].log_path
    log_offset = scheduler_log.stat().st_size
    run_id = start_run(dep, DAG_ID, conf={"n": SIZE})

    def started() -> bool:
        return len(creates(sim.requests(endpoint="create"))) >= SIZE * 0.3

    wait(dep, started, 300, f"{int(SIZE * 0.3)} predictions to exist", interval=0.5)
    storm_started = time.monotonic()
    sim.set_faults(**BASE_FAULTS, rate_limit_429_seconds=STORM_SECONDS, retry_after=RETRY_AFTER)
    created_before_storm = len(creates(sim.requests(endpoint="create")))
    run = dep.wait_for_run(DAG_ID, run_id, timeout=900)
    wall = time.monotonic() - t0
    requests = sim.requests()
    tis = [ti for ti in task_instances(dep, DAG_ID, run_id) if ti["task_id"] == "generate"]
    states = Counter(ti["state"] for ti in tis)
    tries = Counter(ti["try_number"] for ti in tis)
    made = creates(requests)
    answers = Counter((r["endpoint"], r["status"]) for r in requests)
    in_storm = [r for r in requests if r["status"] == 429]
    figures = poll_figures(requests, [c["prediction_id"] for c in made])
    stats = sim.stats()
    scheduler_text = scheduler_log.read_bytes()[log_offset:].decode(errors="replace")
    stalls = [float(x) for x in re.findall(r"Heartbeat recovered after ([0-9.]+) seconds", scheduler_text)]
    resets = re.findall(r"Reset the following (\d+) orphaned TaskInstances", scheduler_text)

    # A scheduler that stalls past [scheduler] scheduler_health_check_threshold resets its own running tasks.
    assert not resets, f"the scheduler stalled ({stalls} s) and reset {resets} task instances"
    assert run["state"] == "success", f"{states}\n{dep.run_report(DAG_ID, run_id)[:5000]}"
    assert len(tis) == SIZE and states == {"success": SIZE}, states
    assert len(made) == SIZE, f"{len(made)} creates for {SIZE} predictions asked for"
    assert len(sim.predictions()) == SIZE
    assert len({c["prediction_id"] for c in made}) == SIZE
    assert {p["status"] for p in sim.predictions()} == {"succeeded"}
    assert cancels(requests) == []
    # The storm really hit both the workers' creates and the triggerers' polls, and so did the 5xx.
    assert answers[("create", 429)] > 0 and answers[("status", 429)] > 0, answers
    assert sum(n for (endpoint, code), n in answers.items() if endpoint == "status" and code >= 500) > 0, answers
    assert figures["polls_per_prediction_max"] <= MAX_POLLS_PER_PREDICTION, figures
    # No hot loop: the whole deployment never comes near a request per prediction per second.
    assert stats["max_requests_per_second"] <= SIZE, stats
    report(
        request,
        6,
        outcome=f"{states['success']}/{SIZE} tasks succeeded (tries {dict(sorted(tries.items()))}; no pool, parallelism {dep.config.parallelism})",
        creates=len(made),
        asked=SIZE,
        created_before_storm=created_before_storm,
        answers_429=len(in_storm),
        create_429=answers[("create", 429)],
        status_429=answers[("status", 429)],
        status_5xx=sum(n for (endpoint, code), n in answers.items() if endpoint == "status" and code >= 500),
        max_requests_per_second=stats["max_requests_per_second"],
        scheduler_stall_max_s=max(stalls, default=0.0),
        seconds=round(wall, 1),
        seconds_after_storm_start=round(time.monotonic() - storm_started, 1),
        **figures,
    )
