"""The connection form's numeric fields against the hook, without a browser (Airflow 2.11 and 3.3).

Airflow 3.3's form enforces a field's ``minimum`` (a lower value goes back to it when the field loses focus;
test_ui.py watches it do so) and ignores ``exclusiveMinimum``: every numeric field needs a ``minimum``, and
the hook must accept it, as well as the field's default.
"""

from __future__ import annotations

from typing import Any

import pytest

from airflow_comet.exceptions import CometAPIConfigError
from airflow_comet.get_provider_info import get_provider_info
from airflow_comet.hooks._settings import ConnectionSettings

FIELDS = get_provider_info()["connection-types"][0]["conn-fields"]
NUMERIC = sorted(name for name, spec in FIELDS.items() if {"number", "integer"} & set(spec["schema"]["type"]))


def settings(extras: dict[str, Any]) -> ConnectionSettings:
    class Conn:
        conn_id, host, port, password = "c", "https://api.example", None, "k"

    return ConnectionSettings.from_connection(Conn(), extras)


def test_the_numeric_fields_are_the_hooks_numeric_settings() -> None:
    assert NUMERIC == sorted(
        ["connect_timeout", "max_requests_per_second", "max_retries", "max_retry_wait", "read_timeout", "retry_backoff"]
    )


@pytest.mark.parametrize("name", NUMERIC)
def test_each_numeric_field_has_a_minimum_the_form_enforces_and_the_hook_accepts(name: str) -> None:
    schema = FIELDS[name]["schema"]
    assert "exclusiveMinimum" not in schema and isinstance(schema.get("minimum"), (int, float)), schema
    assert getattr(settings({name: schema["minimum"]}), name) == schema["minimum"]
    if "default" in schema:
        assert schema["default"] >= schema["minimum"]
    # What the form keeps out, the hook refuses too (the form is not the only way to write a connection).
    with pytest.raises(CometAPIConfigError, match=f"'{name}' must be positive"):
        settings({name: -5})
