"""Shared bits of the reliability test DAGs (not a DAG file: no DAG object is defined here)."""

from __future__ import annotations

from datetime import datetime

try:
    from airflow.sdk import DAG, Param, task
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.decorators import task
    from airflow.models.param import Param

START = datetime(2026, 1, 1)
SCHNELL = "black-forest-labs/flux-schnell"
DEV = "black-forest-labs/flux-dev"
PRO = "black-forest-labs/flux-1.1-pro"
KONTEXT = "black-forest-labs/flux-kontext-pro"

__all__ = ["DAG", "DEV", "KONTEXT", "PRO", "Param", "SCHNELL", "START", "task"]
