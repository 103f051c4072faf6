"""Constants and the figure reporter of the reliability tests (imported by conftest and the scenarios)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.deployment import airflow_version

DAGS = Path(__file__).parent / "dags"
VERSION = airflow_version()
AIRFLOW33 = VERSION >= (3, 3)
NEEDS_33 = (
    f"needs Airflow >= 3.3 (this venv has {'.'.join(map(str, VERSION))}): several triggerers on PostgreSQL, "
    "trigger on_kill and the task state store"
)


def needs_33(why: str) -> str:
    """A skip reason for a scenario that only means something on Airflow >= 3.3."""
    return f"Airflow {'.'.join(map(str, VERSION))}: {why}"


SCHNELL = "black-forest-labs/flux-schnell"
DEV = "black-forest-labs/flux-dev"
PRO = "black-forest-labs/flux-1.1-pro"
KONTEXT = "black-forest-labs/flux-kontext-pro"

#: The triggerer health threshold of the shared deployment (s): a triggerer silent this long loses its
#: triggers to another one. Low so that scenario 2 (SIGSTOP past it) takes seconds, not minutes.
TRIGGERER_HEALTH_THRESHOLD = 10

FIGURES: list[str] = []
SESSION_STARTED = time.monotonic()


def report(request: pytest.FixtureRequest, scenario: str | int, **figures: Any) -> str:
    """Print ``RELIABILITY scenario N: key=value ...`` (at once with ``-s``; always in the terminal summary)."""
    parts = []
    for key, value in figures.items():
        if isinstance(value, float):
            value = f"{value:.1f}"
        parts.append(f"{key}={value}")
    line = f"RELIABILITY scenario {scenario}: " + " ".join(parts)
    FIGURES.append(line)
    if request.config.getoption("capture") == "no":
        print(f"\n{line}", flush=True)
    request.node.user_properties.append(("reliability", line))
    return line
