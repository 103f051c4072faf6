"""Fixtures for the reliability tests (issue 5): a PostgreSQL-backed Airflow 3.3 deployment with two
triggerers, shared by every scenario that needs it, and the figures each scenario reports.

``rel_deployment`` (session scope) starts once: a throw-away PostgreSQL cluster on 127.0.0.1
(``postgres.py``), then api-server, scheduler (LocalExecutor), dag-processor, two triggerers and the CometAPI
simulator (``tests/e2e/deployment.py``), with the DAGs of ``tests/reliability/dags``. The scenario modules
run in file order (``test_s1_...`` to ``test_s8_...``); each resets the simulator and sets its own faults, and
waits for its runs to end, so they do not disturb each other. Scenario 8 (secrets) runs last and searches
everything the others left behind.

Figures: :func:`tests.reliability.common.report` prints one line per scenario starting with
``RELIABILITY scenario N:`` (at once with ``-s``; always again in the terminal summary, so CI's output has
them without ``-s``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.deployment import AirflowDeployment, DeploymentConfig, unsupported_reason
from tests.reliability import helpers, postgres
from tests.reliability.common import (
    AIRFLOW33,
    DAGS,
    FIGURES,
    NEEDS_33,
    SESSION_STARTED,
    TRIGGERER_HEALTH_THRESHOLD,
    VERSION,
)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Every scenario's figures again at the end, so CI's output has them even without ``-s``."""
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for line in FIGURES:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"RELIABILITY total: session {time.monotonic() - SESSION_STARTED:.0f} s")


# --------------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[postgres.PostgresCluster]:
    """A throw-away PostgreSQL server on 127.0.0.1 (a free port), deleted at the end of the session."""
    reason = postgres.unavailable_reason()
    if reason:
        if os.environ.get("CI", "").lower() == "true" and os.environ.get("AIRFLOW_COMET_ALLOW_NO_POSTGRES") != "1":
            pytest.fail(f"CI must run the reliability tests: {reason}")
        pytest.skip(reason)
    with postgres.PostgresCluster() as cluster:
        yield cluster
    assert not cluster.server_pids()


# --------------------------------------------------------------------------------------------------------
# the shared deployment
# --------------------------------------------------------------------------------------------------------


def reliability_config(database_url: str | None, **overrides: Any) -> DeploymentConfig:
    """The shared deployment: quick triggerer health checks, the reliability DAGs, PostgreSQL."""
    fields: dict[str, Any] = dict(
        # One at start; the fixture adds the second once the first has its job, so that it knows which
        # process holds which TriggererJob (see helpers.add_mapped_triggerer).
        triggerers=1,
        database_url=database_url,
        # Each LocalExecutor worker runs one task process at a time; 2 cores tolerate 12 well (scenario 6).
        parallelism=12,
        dags_folder=DAGS,
        # The provider's defaults (6 retries, 1 s first backoff, Retry-After honoured up to 60 s), with
        # shorter timeouts: everything is on 127.0.0.1.
        connection_extra={"read_timeout": 15, "connect_timeout": 5},
        simulator_faults={"durations": [2.0, 6.0]},
        airflow_config={
            "triggerer": {
                "job_heartbeat_sec": 1,
                "triggerer_health_check_threshold": TRIGGERER_HEALTH_THRESHOLD,
            },
            "scheduler": {"max_tis_per_query": 64},
            "core": {"max_active_tasks_per_dag": 200, "max_active_runs_per_dag": 16},
        },
        start_timeout=300.0,
        migrate_timeout=240.0,
    )
    fields.update(overrides)
    return DeploymentConfig(**fields)


@pytest.fixture(scope="session")
def rel_deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AirflowDeployment]:
    """The PostgreSQL-backed Airflow 3.3 deployment with two triggerers, shared by scenarios 1-8."""
    if not AIRFLOW33:
        pytest.skip(NEEDS_33)
    reason = unsupported_reason(VERSION)
    if reason:
        pytest.skip(reason)
    postgres_cluster: postgres.PostgresCluster = request.getfixturevalue("postgres_cluster")
    home = tmp_path_factory.mktemp("reliability-home")
    t0 = time.monotonic()
    deployment = AirflowDeployment(reliability_config(postgres_cluster.url), base_dir=home)
    deployment.postgres = postgres_cluster  # type: ignore[attr-defined]  # scenario 8 dumps the DB
    with deployment:
        helpers.map_running_triggerers(deployment)
        helpers.add_mapped_triggerer(deployment)
        print(
            f"\n[reliability] deployment ready in {time.monotonic() - t0:.1f} s "
            f"({', '.join(f'{k} {v:.1f} s' for k, v in deployment.timings.items())}); AIRFLOW_HOME={home}; "
            f"triggerer jobs {helpers.triggerer_jobs(deployment)}",
            flush=True,
        )
        yield deployment
    leftover = deployment.leftover_pids()
    assert not leftover, f"processes of the deployment still running after stop: {leftover}"


@pytest.fixture(scope="session")
def basic_deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AirflowDeployment]:
    """For the scenarios that also run on older Airflow. Airflow 3.3: the shared PostgreSQL deployment.
    Airflow 2.11: a small one of its own (SQLite, SequentialExecutor, one triggerer), started once."""
    if AIRFLOW33:
        yield request.getfixturevalue("rel_deployment")
        return
    reason = unsupported_reason(VERSION)
    if reason:
        pytest.skip(reason)
    config = DeploymentConfig(
        dags_folder=DAGS,
        connection_extra={"read_timeout": 15, "connect_timeout": 5},
        simulator_faults={"durations": [2.0, 6.0]},
    )
    t0 = time.monotonic()
    deployment = AirflowDeployment(config, base_dir=tmp_path_factory.mktemp("reliability-basic-home"))
    with deployment:
        print(
            f"\n[reliability] Airflow {'.'.join(map(str, VERSION))} deployment ready in {time.monotonic() - t0:.1f} s",
            flush=True,
        )
        yield deployment
    leftover = deployment.leftover_pids()
    assert not leftover, f"processes of the deployment still running after stop: {leftover}"
