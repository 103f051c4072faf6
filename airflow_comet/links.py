"""The operator extra link to a prediction, shown in the Airflow UI (also while the task is deferred)."""

from __future__ import annotations

from typing import Any

from airflow.providers.common.compat.sdk import BaseOperatorLink, XCom

#: XCom key under which tasks push the prediction's URL before they wait (links read it back).
XCOM_PREDICTION_URL = "prediction_url"


class PredictionLink(BaseOperatorLink):
    """Links a task to its prediction: the prediction's web page, else its status URL on the connection."""

    name = "CometAPI prediction"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        url = XCom.get_value(ti_key=ti_key, key=XCOM_PREDICTION_URL)
        return url if isinstance(url, str) else ""


def prediction_url(prediction: dict[str, Any], status_url: str) -> str:
    """The web page of a prediction when the API gives one (http(s) only), else the status URL."""
    urls = prediction.get("urls")
    web = urls.get("web") if isinstance(urls, dict) else None
    if isinstance(web, str) and web.startswith(("https://", "http://")):
        return web
    return status_url
