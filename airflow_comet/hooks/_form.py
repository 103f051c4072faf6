"""The connection form for Airflow 2.11 to 3.1, built from the provider info's ``conn-fields``.

Airflow 3.2+ builds the CometAPI form from ``conn-fields`` itself; older versions ask the hook for wtforms
fields (``get_connection_form_widgets``). Both come from the one definition in ``get_provider_info``, so a
field added there shows in every supported Airflow.
"""

from __future__ import annotations

from typing import Any


def connection_form_widgets(conn_fields: dict[str, Any]) -> dict[str, Any]:
    """wtforms fields for ``conn_fields`` (imported here: only the webserver of older Airflow needs them)."""
    from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
    from flask_babel import lazy_gettext
    from wtforms import BooleanField, IntegerField, StringField
    from wtforms.validators import NumberRange, Optional

    widgets: dict[str, Any] = {}
    for name, field in conn_fields.items():
        schema = field.get("schema", {})
        types = schema.get("type", "string")
        types = [types] if isinstance(types, str) else list(types)
        label = lazy_gettext(field.get("label", name))
        description = field.get("description", "")
        if "boolean" in types:
            widgets[name] = BooleanField(label, description=description, default=schema.get("default", False))
        elif "integer" in types:
            validators = [Optional(), NumberRange(min=schema["minimum"])] if "minimum" in schema else [Optional()]
            widgets[name] = IntegerField(
                label, validators=validators, widget=BS3TextFieldWidget(), description=description
            )
        else:
            # Numbers too: older forms allow no float field; the hook reads "2.5" as 2.5 and names a bad value.
            widgets[name] = StringField(label, widget=BS3TextFieldWidget(), description=description)
    return widgets
