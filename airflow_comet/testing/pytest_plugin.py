"""Pytest fixtures for the CometAPI simulator.

Load with ``pytest_plugins = ["airflow_comet.testing.pytest_plugin"]`` (in the root ``conftest.py``).
Constructor arguments come from the ``cometapi_simulator_options`` fixture (override it in a module or
``conftest.py``, or parametrize it) updated by ``@pytest.mark.cometapi_simulator(**kwargs)`` on a test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from airflow_comet.testing.simulator import CometAPISimulator

CONN_ENV = "AIRFLOW_CONN_COMETAPI_DEFAULT"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cometapi_simulator(**kwargs): CometAPISimulator constructor arguments for the fixture"
    )


@pytest.fixture
def cometapi_simulator_options() -> dict[str, Any]:
    """Keyword arguments for :class:`CometAPISimulator`; override to change the defaults."""
    return {}


@pytest.fixture
def cometapi_simulator(
    request: pytest.FixtureRequest, cometapi_simulator_options: dict[str, Any]
) -> Iterator[CometAPISimulator]:
    """A started simulator on free loopback ports, stopped after the test."""
    kwargs = dict(cometapi_simulator_options)
    marker = request.node.get_closest_marker("cometapi_simulator")
    if marker is not None:
        kwargs.update(marker.kwargs)
    with CometAPISimulator(**kwargs) as sim:
        yield sim


@pytest.fixture
def cometapi_connection(
    cometapi_simulator: CometAPISimulator, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CometAPISimulator]:
    """The simulator, with ``AIRFLOW_CONN_COMETAPI_DEFAULT`` pointing at it for this test."""
    monkeypatch.setenv(CONN_ENV, cometapi_simulator.connection_json())
    yield cometapi_simulator
