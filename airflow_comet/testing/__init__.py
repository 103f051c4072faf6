"""A built-in CometAPI simulator for tests and benchmarks (no Airflow import, loopback only).

    from airflow_comet.testing import CometAPISimulator, Faults

    with CometAPISimulator(faults=Faults(fail_rate=0.1), seed=0) as sim:
        ...  # point a CometAPI connection at sim.base_url with password sim.api_key

Also: ``python -m airflow_comet.testing --port 8765`` and the pytest plugin
``airflow_comet.testing.pytest_plugin`` (fixtures ``cometapi_simulator``, ``cometapi_connection``).
"""

from __future__ import annotations

from airflow_comet.testing.faults import MODEL_DEFAULT, Faults
from airflow_comet.testing.models import DEFAULT_MODELS, ModelSpec
from airflow_comet.testing.simulator import CometAPISimulator
from airflow_comet.testing.state import RequestRecord

__all__ = ["DEFAULT_MODELS", "MODEL_DEFAULT", "CometAPISimulator", "Faults", "ModelSpec", "RequestRecord"]
