"""Fixtures for the end-to-end tests: a real Airflow deployment (see ``deployment.py``).

``airflow_deployment`` (module scope) starts the deployment described by ``airflow_deployment_config``
(module scope) and stops it, with every process it started, after the module's last test. Change the
deployment for a module by overriding ``airflow_deployment_config`` there, or parametrize it::

    @pytest.fixture(scope="module")
    def airflow_deployment_config():
        return DeploymentConfig(triggerers=3, database_url=POSTGRES_URL, reset_database=True)

    @pytest.mark.parametrize("airflow_deployment_config", [{"triggerers": 2}], indirect=True)
    def test_something(airflow_deployment): ...
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest

from tests.e2e.deployment import AirflowDeployment, DeploymentConfig, airflow_version, unsupported_reason


def _skip_unless_supported(config: DeploymentConfig) -> None:
    reason = unsupported_reason(airflow_version(config.python))
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def airflow_deployment_config(request: pytest.FixtureRequest) -> DeploymentConfig:
    """The deployment to start; indirect parametrization accepts a DeploymentConfig or a dict of its fields."""
    param = getattr(request, "param", None)
    if isinstance(param, DeploymentConfig):
        return param
    # Predictions run 10 s: long enough that the sensor still finds them running and defers.
    defaults = DeploymentConfig(simulator_faults={"durations": 10.0})
    return dataclasses.replace(defaults, **(param or {}))


@pytest.fixture(scope="module")
def airflow_deployment(
    airflow_deployment_config: DeploymentConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AirflowDeployment]:
    """A started deployment: api-server, scheduler, dag-processor, N triggerers and the simulator."""
    _skip_unless_supported(airflow_deployment_config)
    home = tmp_path_factory.mktemp("airflow-home")
    t0 = time.monotonic()
    deployment = AirflowDeployment(airflow_deployment_config, base_dir=home)
    with deployment:
        print(
            f"\n[e2e] deployment ready in {time.monotonic() - t0:.1f} s "
            f"({', '.join(f'{k} {v:.1f} s' for k, v in deployment.timings.items())}); AIRFLOW_HOME={home}"
        )
        yield deployment
    leftover = deployment.leftover_pids()
    assert not leftover, f"processes of the deployment still running after stop: {leftover}"
