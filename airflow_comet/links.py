"""The operator extra link "CometAPI prediction": the first output file of a prediction that succeeded."""

from __future__ import annotations

from typing import Any

from airflow.providers.common.compat.sdk import BaseOperatorLink, XCom

from airflow_comet.outputs import check_output_url

#: XCom key under which a task pushes the link once its prediction has succeeded (links read it back).
XCOM_PREDICTION_URL = "prediction_url"


class PredictionLink(BaseOperatorLink):
    """Links a task to the first output file of its succeeded prediction: an image a browser shows for as long
    as CometAPI keeps the file. No link before the prediction succeeded, nor when it failed (Airflow hides an
    empty link).

    CometAPI has no console page per prediction: the ``urls.web`` of its answers is a page of the upstream
    provider's account that a CometAPI user cannot open, and the status URL needs the API key.
    """

    name = "CometAPI prediction"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        url = XCom.get_value(ti_key=ti_key, key=XCOM_PREDICTION_URL)
        return url if isinstance(url, str) else ""


def prediction_link(prediction: dict[str, Any]) -> str:
    """The URL of the first output file of a succeeded prediction (plain http(s) only), else ``""``."""
    if prediction.get("status") != "succeeded":
        return ""
    output = prediction.get("output")
    first = output[0] if isinstance(output, list) and output else output
    try:
        return check_output_url(first, "output")
    except ValueError:  # no output, or one that is not a URL a browser should be sent to
        return ""
