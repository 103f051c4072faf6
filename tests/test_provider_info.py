"""The provider as Airflow finds it: the entry point, provider info valid against Airflow's own schema, and
connection form fields that each set the setting they name."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import airflow
import jsonschema
import pytest

from airflow_comet.get_provider_info import get_provider_info
from airflow_comet.hooks._settings import ConnectionSettings


def _connection_type() -> dict:
    [conn_type] = get_provider_info()["connection-types"]
    return conn_type


def test_airflow_finds_the_provider_through_its_entry_point():
    [entry] = [e for e in entry_points(group="apache_airflow_provider") if e.value.startswith("airflow_comet")]
    assert entry.load()() == get_provider_info()


def test_provider_info_is_valid_against_airflows_own_schema():
    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)


def _settings(extras: dict, base_url: str = "https://api.example") -> ConnectionSettings:
    class Conn:
        conn_id, host, port, password = "c", base_url, None, "k"

    return ConnectionSettings.from_connection(Conn(), extras)


# A value for each form field that differs from the default, and where the parsed settings show it.
SAMPLES = {
    "read_timeout": (33, lambda s: s.read_timeout == 33),
    "connect_timeout": (4, lambda s: s.connect_timeout == 4),
    "max_retries": (2, lambda s: s.max_retries == 2),
    "max_requests_per_second": (7.5, lambda s: s.max_requests_per_second == 7.5),
    "max_retry_wait": (12, lambda s: s.max_retry_wait == 12),
    "retry_backoff": (0.25, lambda s: s.retry_backoff == 0.25),
    "proxy": ("http://corp-proxy:3128", lambda s: s.proxy == "http://corp-proxy:3128"),
    "verify": ("false", lambda s: s.verify is False),
    "allowed_output_hosts": (
        "mirror.corp.example, 10.1.0.0/16",
        lambda s: s.allowed_output_hosts == ("mirror.corp.example", "10.1.0.0/16"),
    ),
}


def test_every_form_field_sets_the_setting_it_names(monkeypatch):
    fields = _connection_type()["conn-fields"]
    assert set(fields) == {*SAMPLES, "trust_env"}
    for name, (value, shows) in SAMPLES.items():
        assert shows(_settings({name: value})), name
        default = fields[name]["schema"].get("default")
        if default is not None:  # the form's default is the hook's own
            assert _settings({name: default}) == _settings({}), name
    # trust_env: false ignores the environment's proxy.
    monkeypatch.setenv("HTTPS_PROXY", "http://env-proxy:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert _settings({"trust_env": True}).proxy == "http://env-proxy:3128"
    assert _settings({"trust_env": False}).proxy is None


@pytest.mark.parametrize(
    "name", ["proxy", "verify", "trust_env", "read_timeout", "max_retries", "allowed_output_hosts"]
)
def test_an_empty_field_means_the_default(name):
    # The form saves a field left empty as "" (or null): that must not be read as a proxy, a CA path or a
    # flag.
    assert _settings({name: ""}) == _settings({}) == _settings({name: None})


def test_the_connection_form_shows_every_extra_in_this_airflow():
    """Airflow's own ProvidersManager builds the form: from conn-fields on 3.2+, from the hook's wtforms
    fields on older versions (2.11 to 3.1); either way every CometAPI extra has its field."""
    from airflow.providers_manager import ProvidersManager

    widgets = ProvidersManager().connection_form_widgets
    ours = {widget.field_name for widget in widgets.values() if widget.hook_class_name.rsplit(".", 1)[-1] == "CometAPIHook"}
    assert ours == set(_connection_type()["conn-fields"])


def test_the_older_forms_fields_follow_the_schema_types():
    pytest.importorskip("wtforms", reason="only Airflow < 3.2's webserver builds forms with wtforms")
    pytest.importorskip("flask_appbuilder", reason="only Airflow < 3.2's webserver builds forms with wtforms")
    from wtforms import BooleanField, IntegerField, StringField

    from airflow_comet.hooks.cometapi import CometAPIHook

    widgets = CometAPIHook.get_connection_form_widgets()
    assert set(widgets) == set(_connection_type()["conn-fields"])
    assert widgets["trust_env"].field_class is BooleanField
    assert widgets["max_retries"].field_class is IntegerField
    assert widgets["read_timeout"].field_class is StringField  # a float; the hook parses and checks it
