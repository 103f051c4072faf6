"""Provider metadata, found by Airflow through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from airflow_comet import DOCS_URL, __version__


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-comet",
        "name": "CometAPI",
        "description": "Generate images (and other model outputs) with CometAPI's Replicate-format "
        "prediction API from Airflow DAGs.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "CometAPI",
                "external-doc-url": DOCS_URL,
                "tags": ["ai"],
            }
        ],
        "hooks": [{"integration-name": "CometAPI", "python-modules": ["airflow_comet.hooks.cometapi"]}],
        "operators": [
            {
                "integration-name": "CometAPI",
                "python-modules": [
                    "airflow_comet.operators.prediction",
                    "airflow_comet.operators.persist",
                    "airflow_comet.operators.batch",
                ],
            }
        ],
        "sensors": [{"integration-name": "CometAPI", "python-modules": ["airflow_comet.sensors.prediction"]}],
        "triggers": [
            {
                "integration-name": "CometAPI",
                "python-modules": ["airflow_comet.triggers.prediction", "airflow_comet.triggers.batch"],
            }
        ],
        "connection-types": [
            {
                "hook-class-name": "airflow_comet.hooks.cometapi.CometAPIHook",
                "hook-name": "CometAPI",
                "connection-type": "cometapi",
                # The port stays visible: Airflow 3.3.2's Test button sends port 0 for an empty port, the
                # api-server takes that for another destination than the stored NULL and refuses to test with
                # the stored key ("Bad Request"; apache/airflow#73298). A saved port (443) avoids it; the hook
                # uses it only when the base URL names none. (Airflow 2 reads the hook's own, unchanged.)
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login"],
                    "relabeling": {"password": "CometAPI key", "host": "Base URL"},
                    "placeholders": {"host": "https://api.cometapi.com", "port": "443 (the Test button needs a port)"},
                },
                # Bounds as "minimum": Airflow 3.3's form enforces minimum/maximum (it puts a value below the
                # minimum back to it when the field loses focus) but ignores exclusiveMinimum. Each minimum is
                # one the hook accepts (_protocol.ConnectionSettings: positive; max_retries may be 0).
                "conn-fields": {
                    "read_timeout": {
                        "label": "Read timeout (s)",
                        "description": "Seconds to wait for an answer; status queries can take over 45 s.",
                        "schema": {"type": ["number", "null"], "minimum": 1, "default": 90},
                    },
                    "connect_timeout": {
                        "label": "Connect timeout (s)",
                        "schema": {"type": ["number", "null"], "minimum": 1, "default": 10},
                    },
                    "max_retries": {
                        "label": "Max retries",
                        "description": "Retries of one request on 429, 5xx and network errors.",
                        "schema": {"type": ["integer", "null"], "minimum": 0, "default": 6},
                    },
                    "max_requests_per_second": {
                        "label": "Max requests per second",
                        "description": "Budget shared by every trigger of this connection in one triggerer.",
                        "schema": {"type": ["number", "null"], "minimum": 0.01},
                    },
                    "max_retry_wait": {
                        "label": "Max Retry-After wait (s)",
                        "description": "The longest a 429's Retry-After is honoured.",
                        "schema": {"type": ["number", "null"], "minimum": 0.1, "default": 60},
                    },
                    "retry_backoff": {
                        "label": "Retry backoff (s)",
                        "description": "The first backoff; it doubles each retry, with jitter.",
                        "schema": {"type": ["number", "null"], "minimum": 0.01, "default": 1},
                    },
                    "proxy": {
                        "label": "Proxy URL",
                        "description": "http://[user:password@]host:port for every request of this connection "
                        "(empty: HTTPS_PROXY / NO_PROXY from the environment, unless switched off below).",
                        "schema": {"type": ["string", "null"]},
                    },
                    "verify": {
                        "label": "TLS CA bundle",
                        "description": "Path of a CA bundle to check the host's certificate with (a proxy that "
                        "re-signs TLS), or false to skip the check (empty: the default CAs).",
                        "schema": {"type": ["string", "null"]},
                    },
                    "allowed_output_hosts": {
                        "label": "Private output hosts",
                        "description": "Host names (mirror.corp.example, *.corp.example) or address ranges "
                        "(10.1.0.0/16), comma-separated, that output downloads may reach although they are not "
                        "public: a private mirror, a proxy that rewrites delivery URLs (docs/security.md).",
                        "schema": {"type": ["string", "null"]},
                    },
                    "trust_env": {
                        "label": "Use environment proxy and CA settings",
                        "description": "Read HTTPS_PROXY, NO_PROXY and REQUESTS_CA_BUNDLE from the environment.",
                        "schema": {"type": ["boolean", "null"], "default": True},
                    },
                },
            }
        ],
        "extra-links": ["airflow_comet.links.PredictionLink"],
        "task-decorators": [{"name": "cometapi", "class-name": "airflow_comet.decorators.cometapi.cometapi_task"}],
    }
