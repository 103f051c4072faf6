"""airflow-comet: an Apache Airflow provider for CometAPI's Replicate-format prediction API."""

from __future__ import annotations

__version__ = "0.1.0"
