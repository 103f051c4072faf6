"""PersistPredictionOutputOperator: copy a succeeded prediction's output files to Airflow object storage."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import Asset, BaseOperator

from airflow_comet.exceptions import PredictionFailedError
from airflow_comet.hooks._protocol import FAILED_STATUSES, NON_TERMINAL_STATUSES
from airflow_comet.hooks._retry import RetryPolicy
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.output_files import StagedFile, destination_folder, output_stem
from airflow_comet.outputs import (
    DEFAULT_MAX_BYTES,
    DEFAULT_TIMEOUT,
    Timeout,
    accepted_content_types,
    address_policy_for,
    check_output_url,
    display_url,
    download,
    plain_session,
    with_retries,
)
from airflow_comet.validation import is_templated, validate_prediction_id

if TYPE_CHECKING:
    import requests
    from airflow.providers.common.compat.sdk import Context, ObjectStoragePath

    from airflow_comet._address_guard import AddressPolicy


class PersistPredictionOutputOperator(BaseOperator):
    """
    Download a succeeded prediction's output files into a folder on Airflow object storage.

    Each output URL is streamed (memory does not grow with the file), checked (status, Content-Type
    against the prediction's ``output_format``, size limit, Content-Length) and hashed, then published
    atomically as ``<destination>/<prediction id>-<index>.<ext>``: a failed download leaves no file, and
    a rerun overwrites the same names. Names come only from the prediction id and the output index, never
    from the URL. Downloads go through a fresh session that sends no CometAPI key and no
    ``Authorization`` header at all.

    The XCom ``return_value`` is one dict per file: ``url``, ``path``, ``size``, ``sha256``,
    ``content_type``, ``prediction_id`` and ``index``. ``path`` is the ``ObjectStoragePath`` as text,
    with the connection id when one is used (``s3://conn_id@bucket/...``), so ``ObjectStoragePath(path)``
    opens the file again.

    To let other DAGs run on new images, declare the folder as an asset:
    ``outlets=[Asset("s3://bucket/images/")]`` (``Dataset`` on Airflow 2). The asset event's ``extra``
    then lists the files written (``prediction_id`` and ``files``).

    Mapped over a sensor: ``PersistPredictionOutputOperator.partial(task_id="persist",
    destination="s3://bucket/images/{{ ds }}/", fail_on_error=False).expand(prediction=wait.output)``,
    with the sensor's ``fail_on_error=False`` too, so that one refused prompt does not stop the others'
    images from being saved (see ``dags_examples/comet_image_pipeline.py``).

    :param prediction: The prediction object (a dict, e.g. ``PredictionSensor``'s output) or a prediction
        id, which is then fetched from CometAPI (templated). It must have succeeded, or have ended (see
        ``fail_on_error``).
    :param destination: The folder to write into: ``file:///...``, ``s3://bucket/prefix/`` or
        ``s3://conn_id@bucket/prefix/``, or an ``ObjectStoragePath`` (templated).
    :param cometapi_conn_id: The CometAPI connection: used to fetch a prediction given by id, and for the
        private hosts output files may come from (its extra ``allowed_output_hosts``; docs/security.md).
    :param destination_conn_id: The connection for ``destination`` (e.g. an ``aws`` connection); overrides
        a conn id written in the URL (templated).
    :param max_bytes: Largest file accepted; a larger one fails the task and nothing is written.
    :param timeout: Seconds for connecting and between two received chunks: one number or
        ``(connect, read)``.
    :param download_retries: Retries of one file on connection errors, truncation, 408/429/5xx (with the
        hook's backoff; ``Retry-After`` honoured).
    :param retry_backoff: First backoff between download retries, in seconds (doubles each retry).
    :param expected_content_types: Media types the files must have (``"image/*"`` wildcards allowed).
        Default: the type of the prediction input's ``output_format`` (webp, png, jpg/jpeg), or any
        ``image/*`` when it has none.
    :param fail_on_error: Fail for a prediction that ended ``failed``, ``canceled`` or ``aborted``; with
        ``False`` such a prediction persists nothing and the task returns ``[]`` (one still running fails
        the task either way: wait for it first).
    """

    template_fields: Sequence[str] = ("prediction", "destination", "destination_conn_id")
    template_fields_renderers: ClassVar[dict[str, str]] = {"prediction": "json"}
    ui_color = "#e4f4ec"

    def __init__(
        self,
        *,
        prediction: Mapping[str, Any] | str,
        destination: str | ObjectStoragePath,
        cometapi_conn_id: str = CometAPIHook.default_conn_name,
        destination_conn_id: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: Timeout = DEFAULT_TIMEOUT,
        download_retries: int = 4,
        retry_backoff: float = 1.0,
        expected_content_types: Iterable[str] | str | None = None,
        fail_on_error: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Static values are checked now, so that a typo fails when the DAG is parsed.
        if isinstance(prediction, str) and not is_templated(prediction):
            given = _from_json_text(prediction)
            if isinstance(given, str):
                _id_from_text(given)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        if isinstance(download_retries, bool) or not isinstance(download_retries, int) or download_retries < 0:
            raise ValueError(f"download_retries must be a whole number >= 0, got {download_retries!r}")
        if retry_backoff <= 0:
            raise ValueError(f"retry_backoff must be positive, got {retry_backoff!r}")
        _check_timeout(timeout)
        if expected_content_types is not None:
            accepted_content_types(None, expected_content_types)
        self.prediction = prediction
        self.destination = destination
        self.cometapi_conn_id = cometapi_conn_id
        self.destination_conn_id = destination_conn_id
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.download_retries = download_retries
        self.retry_backoff = retry_backoff
        self.expected_content_types = expected_content_types
        self.fail_on_error = fail_on_error

    def execute(self, context: Context) -> list[dict[str, Any]]:
        prediction = self._load_prediction()
        prediction_id = prediction["id"]
        self._lineage = {"model": prediction.get("model"), "prediction_ids": [prediction_id], "outputs": []}
        if prediction.get("status") != "succeeded":  # ended, and fail_on_error=False let it through
            self.log.warning(
                "Prediction %s ended %s (%s): nothing to persist",
                prediction_id,
                prediction.get("status"),
                prediction.get("error") or "no error given",
            )
            return []
        urls = output_urls(prediction)
        accepted = accepted_content_types(prediction.get("input"), self.expected_content_types)
        folder = destination_folder(self.destination, self.destination_conn_id)
        policy = RetryPolicy(max_retries=self.download_retries, backoff_base=self.retry_backoff)
        self.log.info("Persisting %d output file(s) of prediction %s into %s", len(urls), prediction_id, folder)

        timeout = tuple(self.timeout) if isinstance(self.timeout, list) else self.timeout
        files = persist_outputs(
            prediction_id,
            urls,
            folder,
            accepted=accepted,
            max_bytes=self.max_bytes,
            timeout=timeout,
            policy=policy,
            logger=self.log,
            addresses=address_policy_for(self.cometapi_conn_id, self.log),
        )
        self._annotate_asset_events(context, prediction_id, files)
        self._lineage["outputs"] = [record["path"] for record in files]
        return files

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: one output dataset per file written; the prediction's model and id as run facets."""
        from airflow_comet.lineage import prediction_lineage

        return prediction_lineage(**getattr(self, "_lineage", {"model": None, "prediction_ids": []}))

    def _load_prediction(self) -> dict[str, Any]:
        value = self.prediction
        if isinstance(value, str):
            value = _from_json_text(value)
        if isinstance(value, str):
            prediction_id = _id_from_text(value)
            value = CometAPIHook(cometapi_conn_id=self.cometapi_conn_id).get_prediction(prediction_id)
        if not isinstance(value, Mapping):
            raise ValueError(f"prediction must be a prediction object (dict) or id, got {type(value).__name__}")
        prediction = dict(value)
        prediction_id = validate_prediction_id(prediction.get("id"))
        status = prediction.get("status")
        if status in FAILED_STATUSES and not self.fail_on_error:
            return prediction
        if status != "succeeded":
            detail = f": {prediction['error']}" if prediction.get("error") else ""
            if status in NON_TERMINAL_STATUSES:
                detail = "; wait for it first (PredictionSensor, or wait_for_completion=True)"
            raise PredictionFailedError(
                f"Prediction {prediction_id} has status {status!r}, not 'succeeded'; it has no output to "
                f"persist{detail}"
            )
        return prediction

    def _annotate_asset_events(self, context: Context, prediction_id: str, files: list[dict[str, Any]]) -> None:
        """Put the files written into the ``extra`` of this task's asset events (``outlets``)."""
        outlets = [o for o in (self.outlets or []) if isinstance(o, Asset)]
        outlet_events = context.get("outlet_events") if outlets else None
        if outlet_events is None:
            return
        extra: dict[str, Any] = {
            "prediction_id": prediction_id,
            "files": [{"path": f["path"], "size": f["size"], "sha256": f["sha256"]} for f in files],
        }
        for asset in outlets:
            outlet_events[asset].extra = extra


def persist_outputs(
    prediction_id: str,
    urls: Sequence[str],
    folder: ObjectStoragePath,
    *,
    accepted: tuple[str, ...],
    max_bytes: int,
    timeout: Timeout,
    policy: RetryPolicy,
    logger: Any,
    addresses: AddressPolicy,
) -> list[dict[str, Any]]:
    """Download ``urls`` (a prediction's outputs, in order) into ``folder``; one record per file written.

    Each file is retried under ``policy`` and published under ``<prediction id>-<index>.<ext>`` only once
    it has fully arrived. Shared by :class:`PersistPredictionOutputOperator` and the batch operator.
    """
    files = []
    # A session of its own, never the hook's: the CometAPI key must not reach the file host. It connects
    # only to public addresses, plus the exceptions set on the CometAPI connection (docs/security.md).
    with plain_session(addresses) as session:
        for index, url in enumerate(urls):
            one_file = functools.partial(
                _persist_one, session, folder, prediction_id, index, url, accepted, timeout, max_bytes
            )
            record = with_retries(one_file, policy=policy, logger=logger, what=f"download {display_url(url)}")
            logger.info(
                "Wrote %s (%d bytes, %s, sha256 %s)",
                record["path"],
                record["size"],
                record["content_type"],
                record["sha256"],
            )
            files.append(record)
    return files


def _persist_one(
    session: requests.Session,
    folder: ObjectStoragePath,
    prediction_id: str,
    index: int,
    url: str,
    accepted: tuple[str, ...],
    timeout: Timeout,
    max_bytes: int,
) -> dict[str, Any]:
    """One attempt at one file: download aside, publish under its final name only if all went well."""
    with StagedFile(folder, output_stem(prediction_id, index)) as staged:
        got = download(session, url, staged.open, accepted=accepted, max_bytes=max_bytes, timeout=timeout)
        path = staged.publish()
    return {
        "url": url,
        "path": str(path),
        "size": got.size,
        "sha256": got.sha256,
        "content_type": got.content_type,
        "prediction_id": prediction_id,
        "index": index,
    }


def output_urls(prediction: Mapping[str, Any]) -> list[str]:
    """The prediction's output URLs: ``output`` is a list of URLs, or a single URL string (some models)."""
    prediction_id = prediction.get("id")
    output = prediction.get("output")
    if isinstance(output, str):
        output = [output]
    if not isinstance(output, list) or not output:
        raise PredictionFailedError(
            f"Prediction {prediction_id} succeeded but has no output files (output is {output!r:.80})"
        )
    return [check_output_url(url, f"prediction {prediction_id} output[{i}]") for i, url in enumerate(output)]


def _from_json_text(value: str) -> Any:
    """``value`` decoded when it is JSON text of an id or a prediction object, else ``value`` itself.

    Airflow 3.3's triggerer stores the XComs of a task it ends (``end_from_trigger``) JSON-encoded, and the task
    SDK hands them to downstream tasks as that text (``'"<id>"'``, ``'{"id": ...}'``), not as the value."""
    text = value.strip()
    if text[:1] in ('"', "{"):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return value


def _id_from_text(value: str) -> str:
    try:
        return validate_prediction_id(value.strip())
    except ValueError:
        raise ValueError(
            f"prediction must be a prediction object or a prediction id, got the string {value[:80]!r}. "
            "To pass a sensor's result use prediction=wait.output (a Jinja string renders dicts as text "
            "unless the DAG sets render_template_as_native_obj=True)."
        ) from None


def _check_timeout(timeout: Any) -> None:
    values = timeout if isinstance(timeout, (tuple, list)) else (timeout,)
    if (isinstance(timeout, (tuple, list)) and len(values) != 2) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in values
    ):
        raise ValueError(f"timeout must be positive seconds or a (connect, read) pair, got {timeout!r}")


__all__ = ["PersistPredictionOutputOperator", "output_urls", "persist_outputs"]
