"""OpenLineage for the files this provider writes and reads.

Imported only inside the operators' ``get_openlineage_facets_on_complete`` methods: the OpenLineage
provider is an optional extra (``airflow-comet[openlineage]``), and this module needs it.

Datasets are named as the OpenLineage naming spec says for their store: ``file`` and the absolute path
for a local file, ``s3://bucket`` and the key for an object (likewise ``gs://``, ...). The run gets a
``cometapi_prediction`` facet with the model and the prediction ids, and the standard
``externalQuery`` facet when there is one prediction (as a warehouse's query id is reported).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import attr
from airflow.providers.common.compat.openlineage.facet import Dataset, ExternalQueryRunFacet, RunFacet
from airflow.providers.common.compat.sdk import ObjectStoragePath
from airflow.providers.openlineage.extractors import OperatorLineage

from airflow_comet import DOCS_URL
from airflow_comet.output_files import is_local

__all__ = ["CometAPIPredictionRunFacet", "dataset_for", "prediction_lineage"]


@attr.define
class CometAPIPredictionRunFacet(RunFacet):
    """The CometAPI model a run used and the predictions it made or read."""

    model: str | None
    predictionIds: list[str]

    @staticmethod
    def _get_schema() -> str:
        return f"{DOCS_URL}/lineage.md#cometapi_prediction"


def dataset_for(path: Any) -> Dataset:
    """The OpenLineage dataset of one file, from its path (text, ``Path`` or ``ObjectStoragePath``)."""
    if not isinstance(path, ObjectStoragePath) and "://" not in os.fspath(path):
        return Dataset(namespace="file", name=os.path.abspath(os.fspath(path)))
    location = path if isinstance(path, ObjectStoragePath) else ObjectStoragePath(str(path))
    # Local files are named by their absolute path; objects by their key within the bucket's namespace.
    if is_local(location):
        return Dataset(namespace="file", name=location.path)
    # Built here rather than taken from .namespace: Airflow 2's keeps the conn id ("s3://conn_id@bucket").
    bucket = location.bucket.rsplit("@", 1)[-1]
    return Dataset(namespace=f"{location.protocol}://{bucket}", name=location.key)


def prediction_lineage(
    *,
    model: str | None,
    prediction_ids: Iterable[str],
    outputs: Iterable[Any] = (),
    inputs: Iterable[Any] = (),
) -> OperatorLineage:
    """Lineage of a task that made or read predictions: the files read and written, and the run facets."""
    ids = [pid for pid in prediction_ids if pid]
    run_facets: dict[str, Any] = {"cometapi_prediction": CometAPIPredictionRunFacet(model=model, predictionIds=ids)}
    if len(ids) == 1:
        run_facets["externalQuery"] = ExternalQueryRunFacet(externalQueryId=ids[0], source="cometapi")
    return OperatorLineage(
        inputs=[dataset_for(path) for path in inputs],
        outputs=[dataset_for(path) for path in outputs],
        run_facets=run_facets,
    )
