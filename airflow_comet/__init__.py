"""airflow-comet: an Apache Airflow provider for CometAPI's Replicate-format prediction API."""

from __future__ import annotations

__version__ = "0.1.0"

#: Where this project's documentation lives (the provider info's link, custom OpenLineage facets' schemas).
DOCS_URL = "https://github.com/airflow-comet/airflow-comet/blob/main/docs"
