"""PersistPredictionOutputOperator against real servers on loopback: the simulator's delivery host, small
purpose-built file hosts, a local folder and an S3-compatible server (moto) reached through Airflow's
object storage."""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from airflow_comet.exceptions import PredictionFailedError
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.operators.persist import PersistPredictionOutputOperator
from airflow_comet.outputs import OutputDownloadError
from airflow_comet.testing import Faults
from tests.conftest import API_KEY, set_connection
from tests.scripted_server import Answer, ScriptedServer

FLUX = "black-forest-labs/flux-schnell"
AWS_CONN_ID = "aws_persist_test"


@pytest.fixture(autouse=True)
def _loopback_api(monkeypatch: pytest.MonkeyPatch) -> None:
    # The file hosts here listen on 127.0.0.1, which output downloads may reach only when the CometAPI
    # connection is loopback too, as with the simulator (docs/security.md). ``sim`` points it at itself.
    set_connection(monkeypatch, "http://127.0.0.1:9")


# -- destinations: a local folder and a bucket on a real S3-compatible server -------------------------------


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class Destination:
    """Where a test persists to, and everything that test may have written anywhere."""

    kind: str
    url: str  # the folder handed to the operator
    conn_id: str | None
    root: Path  # tmp_path: a local destination lives in it, and so does the local staging directory
    bucket: str | None = None
    s3: Any = None

    def names(self) -> list[str]:
        """Every file under the destination folder, hidden ones included, relative to it."""
        if self.kind == "file":
            folder = Path(self.url.removeprefix("file://"))
            return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        return sorted(key.removeprefix("images/") for key in self.keys())

    def keys(self) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def read(self, name: str) -> bytes:
        if self.kind == "file":
            return (Path(self.url.removeprefix("file://")) / name).read_bytes()
        return self.s3.get_object(Bucket=self.bucket, Key=f"images/{name}")["Body"].read()

    def stray_files(self) -> list[str]:
        """Files anywhere under tmp_path (local staging included) that are not under the destination."""
        folder = Path(self.url.removeprefix("file://")) if self.kind == "file" else None
        found = []
        for path in self.root.rglob("*"):
            if path.is_file() and not (folder and folder in path.parents) and path.name != "netrc":
                found.append(str(path.relative_to(self.root)))
        if self.kind == "s3":
            found += [key for key in self.keys() if not key.startswith("images/")]
        return sorted(found)


@pytest.fixture(params=["file", "s3"])
def dest(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Destination:
    # Local staging files (for uploads) go under tmp_path too, so a leftover would be seen.
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    if request.param == "file":
        folder = tmp_path / "out" / "images"
        return Destination("file", folder.as_uri() + "/", None, tmp_path)

    import boto3

    endpoint = request.getfixturevalue("moto_endpoint")
    conn = {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{AWS_CONN_ID.upper()}", json.dumps(conn))
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    bucket = f"persist-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    return Destination("s3", f"s3://{bucket}/images/", AWS_CONN_ID, tmp_path, bucket=bucket, s3=s3)


# -- helpers ---------------------------------------------------------------------------------------------------


def succeeded(sim: Any, **input: Any) -> dict[str, Any]:
    """Create a prediction on the simulator and return it once it has succeeded."""
    hook = CometAPIHook()
    prediction = hook.create_prediction(FLUX, {"prompt": "a paper boat", **input})
    deadline = time.monotonic() + 15
    while prediction["status"] != "succeeded":
        assert prediction["status"] in ("starting", "processing"), prediction
        assert time.monotonic() < deadline, "the simulator did not finish the prediction"
        time.sleep(0.1)
        prediction = hook.get_prediction(prediction["id"])
    return prediction


def eventually(read: Any, settle: float = 0.3, timeout: float = 5.0) -> Any:
    """``read()`` once it is truthy and has stopped changing for ``settle`` seconds."""
    deadline = time.monotonic() + timeout
    value = read()
    while time.monotonic() < deadline:
        time.sleep(settle)
        again = read()
        if again and again == value:
            return again
        value = again
    return value


def persist(prediction: Any, dest: Destination, **kwargs: Any) -> list[dict[str, Any]]:
    kwargs.setdefault("retry_backoff", 0.01)
    operator = PersistPredictionOutputOperator(
        task_id="persist", prediction=prediction, destination=dest.url, destination_conn_id=dest.conn_id, **kwargs
    )
    return operator.execute({})


def fake_prediction(urls: Any, pid: str = "hostile01", **extra: Any) -> dict[str, Any]:
    return {"id": pid, "status": "succeeded", "input": {"prompt": "x", "output_format": "png"}, "output": urls, **extra}


class FileHost:
    """A file host that answers every GET with ``body``, optionally without Content-Length (the body then
    ends when the connection closes), and records what it was sent."""

    def __init__(self, body: bytes, content_type: str = "image/png", send_length: bool = True) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if send_length else "HTTP/1.0"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                host.seen.append((self.path, dict(self.headers)))
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                if send_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for start in range(0, len(body), 65536):
                        self.wfile.write(body[start : start + 65536])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should past max_bytes

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FileHost:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def png_bytes() -> bytes:
    from airflow_comet.testing.images import render_image

    return render_image("hostile", width=64, height=64, output_format="png")


# -- the happy path ----------------------------------------------------------------------------------------


def test_files_are_byte_identical_with_their_sha256(sim, dest):
    prediction = succeeded(sim, num_outputs=2, output_format="png")
    files = persist(prediction, dest)

    pid = prediction["id"]
    assert [f["index"] for f in files] == [0, 1]
    assert dest.names() == [f"{pid}-0.png", f"{pid}-1.png"]
    for record, url in zip(files, prediction["output"]):
        direct = requests.get(url, timeout=10).content  # what the file host serves, fetched independently
        name = f"{pid}-{record['index']}.png"
        assert dest.read(name) == direct
        assert record == {
            "url": url,
            "path": record["path"],
            "size": len(direct),
            "sha256": hashlib.sha256(direct).hexdigest(),
            "content_type": "image/png",
            "prediction_id": pid,
            "index": record["index"],
        }
        assert record["path"].endswith(f"/images/{name}")
        assert record["path"].startswith("file:///" if dest.kind == "file" else f"s3://{AWS_CONN_ID}@{dest.bucket}/")
    assert direct.startswith(b"\x89PNG")
    assert dest.stray_files() == []


def test_s3_objects_get_the_image_content_type(sim, dest):
    if dest.kind != "s3":
        pytest.skip("object metadata only exists on S3")
    prediction = succeeded(sim, output_format="webp")
    [record] = persist(prediction, dest)
    head = dest.s3.head_object(Bucket=dest.bucket, Key=f"images/{prediction['id']}-0.webp")
    assert head["ContentType"] == "image/webp"
    assert head["ContentLength"] == record["size"]


def test_a_prediction_id_is_fetched_through_the_hook_but_the_key_never_reaches_the_file_host(
    sim, dest, tmp_path, monkeypatch
):
    # requests would add Basic auth for a host listed in ~/.netrc; the download session must not.
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login netrc-user password netrc-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    prediction = succeeded(sim, output_format="webp")

    files = persist(prediction["id"], dest)

    assert files[0]["prediction_id"] == prediction["id"]
    assert any(r.endpoint == "status" and r.prediction_id == prediction["id"] for r in sim.requests)
    delivery = sim.delivery_requests()
    assert [r.endpoint for r in delivery] == ["file"]
    assert all("Authorization" not in r.headers and "authorization" not in r.headers for r in delivery)
    assert all(API_KEY not in json.dumps(r.headers) for r in delivery)


def test_redirects_are_followed_without_credentials(dest, tmp_path, monkeypatch):
    # CDNs redirect to signed URLs; requests would re-read ~/.netrc for the new host on the way.
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login netrc-user password netrc-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    body = png_bytes()
    with FileHost(body) as target, ScriptedServer() as cdn:
        cdn.script(Answer(status=302, body="", headers={"Location": f"{target.url}/signed.png?sig=abc"}))
        [record] = persist(fake_prediction([f"{cdn.url}/out.png"], pid="redirected"), dest)
        assert [path for path, _ in target.seen] == ["/signed.png?sig=abc"]
        assert all("Authorization" not in headers for _, headers in target.seen)
        assert all("Authorization" not in seen.headers for seen in cdn.seen)
    assert record["sha256"] == hashlib.sha256(body).hexdigest() and dest.read("redirected-0.png") == body


def test_single_url_output_is_accepted(sim, dest):
    prediction = succeeded(sim, output_format="jpg")
    prediction["output"] = prediction["output"][0]  # some models answer one URL, not a list
    [record] = persist(prediction, dest)
    assert record["content_type"] == "image/jpeg"
    assert dest.names() == [f"{prediction['id']}-0.jpg"]


def test_the_json_text_of_an_end_from_trigger_xcom_is_read_as_its_value(sim, dest):
    # Airflow 3.3's triggerer stores the XComs of a task it ends JSON-encoded, and a downstream task gets that
    # text: the id with its quotes, or the prediction as a JSON object (benchmarks/real_airflow.py, shape b).
    by_id = succeeded(sim, output_format="webp")
    as_object = succeeded(sim, output_format="webp")

    [from_id] = persist(json.dumps(by_id["id"]), dest)
    [from_object] = persist(json.dumps(as_object), dest)

    assert (from_id["prediction_id"], from_object["prediction_id"]) == (by_id["id"], as_object["id"])
    assert dest.names() == sorted([f"{by_id['id']}-0.webp", f"{as_object['id']}-0.webp"])
    with pytest.raises(ValueError, match="prediction must be a prediction object or a prediction id"):
        persist('"../x"', dest)


def test_rerun_overwrites_the_same_names(sim, dest):
    prediction = succeeded(sim, num_outputs=2, output_format="png")
    first = persist(prediction, dest)
    names = dest.names()
    if dest.kind == "file":  # spoil one file: the rerun must replace it, not add a second copy
        (Path(dest.url.removeprefix("file://")) / names[0]).write_bytes(b"stale")
    second = persist(prediction, dest)
    assert dest.names() == names and len(names) == 2
    assert [f["sha256"] for f in second] == [f["sha256"] for f in first]
    assert hashlib.sha256(dest.read(names[0])).hexdigest() == first[0]["sha256"]


def test_plain_absolute_path_destination_with_a_template(sim, tmp_path):
    # A folder without scheme, with {{ ds }}: rendered like any template field before execute.
    prediction = succeeded(sim)
    operator = PersistPredictionOutputOperator(
        task_id="persist", prediction=prediction, destination=str(tmp_path) + "/{{ ds }}/"
    )
    assert "destination" in operator.template_fields and "prediction" in operator.template_fields
    operator.destination = operator.render_template(operator.destination, {"ds": "2026-01-02"})
    [record] = operator.execute({})
    assert Path(record["path"]).parent == tmp_path / "2026-01-02"


# -- failures leave nothing behind -------------------------------------------------------------------------


def test_404_fails_without_retrying_and_writes_nothing(sim, dest):
    prediction = succeeded(sim, output_format="png")
    sim.set_faults(Faults(file_404=True))
    with pytest.raises(OutputDownloadError, match=r"answered 404.*may have expired"):
        persist(prediction, dest)
    assert len(sim.downloads(prediction["id"])) == 1  # a 404 is final
    assert dest.names() == [] and dest.stray_files() == []


def test_truncated_download_is_retried_then_fails_and_writes_nothing(sim, dest):
    prediction = succeeded(sim, output_format="png")
    sim.set_faults(Faults(file_truncated=True))
    with pytest.raises(OutputDownloadError, match="cut off|truncated"):
        persist(prediction, dest, download_retries=2)
    assert len(sim.downloads(prediction["id"])) == 3
    assert dest.names() == [] and dest.stray_files() == []


def test_transient_errors_are_retried_with_the_hook_policy(dest):
    image = png_bytes()
    with ScriptedServer() as host:
        host.script(
            Answer(status=503, body="busy"),
            Answer(status=429, body="slow down", headers={"Retry-After": "0"}),
            Answer(status=200, body=image, content_type="image/png"),
        )
        [record] = persist(fake_prediction([f"{host.url}/out.png"], pid="retry01"), dest, download_retries=3)
        assert len(host.seen) == 3
    assert record["sha256"] == hashlib.sha256(image).hexdigest()
    assert dest.read("retry01-0.png") == image


def test_size_limit_from_content_length(sim, dest):
    prediction = succeeded(sim, output_format="png")
    sim.set_faults(Faults(file_size_bytes=300_000))
    with pytest.raises(OutputDownloadError, match=r"300000 bytes \(Content-Length\), over the limit of 100000"):
        persist(prediction, dest, max_bytes=100_000)
    # The simulator logs a request once its handler ends, which is after our early hang-up.
    assert eventually(lambda: len(sim.downloads(prediction["id"]))) == 1  # too large is final
    assert dest.names() == [] and dest.stray_files() == []


def test_size_limit_when_the_stream_grows_past_it(dest):
    # No Content-Length: only counting the bytes can stop it.
    with FileHost(png_bytes() + bytes(400_000), send_length=False) as host:
        with pytest.raises(OutputDownloadError, match="grew past the limit of 100000 bytes"):
            persist(fake_prediction([f"{host.url}/big.png"]), dest, max_bytes=100_000)
        assert len(host.seen) == 1
    assert dest.names() == [] and dest.stray_files() == []


def test_a_file_within_the_limit_without_content_length_is_kept(dest):
    body = png_bytes()
    with FileHost(body, send_length=False) as host:
        [record] = persist(fake_prediction([f"{host.url}/ok.png"], pid="nolength"), dest)
    assert record["size"] == len(body) and dest.read("nolength-0.png") == body


@pytest.mark.parametrize(
    ("served", "output_format"), [("text/html", "png"), ("image/webp", "png"), ("application/octet-stream", None)]
)
def test_content_type_mismatch_fails_and_writes_nothing(sim, dest, served, output_format):
    prediction = succeeded(sim, **({"output_format": output_format} if output_format else {}))
    sim.set_faults(Faults(file_content_type=served))
    expected = "image/png" if output_format else "image/\\*"
    with pytest.raises(OutputDownloadError, match=f"served as '{served}', expected {expected}"):
        persist(prediction, dest)
    assert dest.names() == [] and dest.stray_files() == []


def test_expected_content_types_overrides_output_format(sim, dest):
    prediction = succeeded(sim, output_format="png")
    sim.set_faults(Faults(file_content_type="image/avif"))
    [record] = persist(prediction, dest, expected_content_types=["image/avif"])
    assert record["content_type"] == "image/avif" and dest.names() == [f"{prediction['id']}-0.avif"]


# -- what the prediction says is not trusted -----------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/files/%2e%2e%2f%2e%2e%2f%2e%2e%2fescape.png",
        "/v1/files/..%2F..%2F..%2Fescape.png",
        "/a/b/../../etc/passwd",
        "/v1/files/x/..%5c..%5cwin.png",
    ],
)
def test_hostile_urls_cannot_choose_where_files_go(dest, path):
    body = png_bytes()
    with FileHost(body) as host:
        files = persist(fake_prediction([host.url + path], pid="safe-id_1"), dest)
        assert len(host.seen) == 1  # it was downloaded, from whatever path the URL gave
    assert dest.names() == ["safe-id_1-0.png"]
    assert dest.stray_files() == []
    assert files[0]["path"].endswith("/images/safe-id_1-0.png")


@pytest.mark.parametrize("pid", ["../../etc", "a/b", "..", "x y", ""])
def test_hostile_prediction_ids_are_refused(dest, pid):
    with pytest.raises(ValueError, match="prediction_id must be a CometAPI prediction id"):
        persist(fake_prediction(["http://127.0.0.1:9/x.png"], pid=pid), dest)
    assert dest.names() == []


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "data:image/png;base64,iVBORw0KGgo=", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1/"],
)
def test_non_http_output_urls_are_refused_before_any_request(dest, url):
    with pytest.raises(ValueError, match=r"output\[0\] has scheme .*only http:// and https://"):
        persist(fake_prediction([url]), dest)
    assert dest.names() == []


def test_credentials_in_an_output_url_are_refused(dest):
    with FileHost(png_bytes()) as host:
        url = host.url.replace("http://", "http://user:secret@") + "/x.png"
        with pytest.raises(ValueError, match="carries credentials"):
            persist(fake_prediction([url]), dest)
        assert host.seen == []


@pytest.mark.parametrize("status", ["failed", "canceled", "processing", "starting"])
def test_a_prediction_that_did_not_succeed_is_refused(dest, status):
    prediction = fake_prediction(None, pid="notdone1", status=status, error="NSFW" if status == "failed" else None)
    expected = f"Prediction notdone1 has status '{status}', not 'succeeded'"
    with pytest.raises(PredictionFailedError, match=expected) as error:
        persist(prediction, dest)
    hint = "NSFW" if status == "failed" else "wait for it first" if status in ("processing", "starting") else ""
    assert hint in str(error.value)
    assert dest.names() == []


@pytest.mark.parametrize("status", ["failed", "canceled", "aborted", "processing"])
def test_fail_on_error_false_persists_nothing_for_an_ended_prediction(dest, status):
    """A failed prediction handed on by a sensor with fail_on_error=False: nothing to do, no error; one that
    is still running is a mistake in the DAG and still fails."""
    prediction = fake_prediction(None, pid="notdone1", status=status, error="NSFW")
    if status == "processing":
        with pytest.raises(PredictionFailedError, match="wait for it first"):
            persist(prediction, dest, fail_on_error=False)
    else:
        assert persist(prediction, dest, fail_on_error=False) == []
    assert dest.names() == []


def test_a_failed_prediction_fetched_by_id_is_refused(sim, dest):
    sim.set_faults(Faults(durations=0.1, fail_rate=1.0))
    created = CometAPIHook().create_prediction(FLUX, {"prompt": "x"})
    time.sleep(0.3)
    with pytest.raises(PredictionFailedError, match=f"{created['id']} has status 'failed'.*NSFW"):
        persist(created["id"], dest)


@pytest.mark.parametrize("output", [None, [], {}])
def test_no_outputs_is_an_error(dest, output):
    with pytest.raises(PredictionFailedError, match="succeeded but has no output files"):
        persist(fake_prediction(output), dest)


def test_a_templated_dict_rendered_as_text_gets_a_hint(dest):
    with pytest.raises(ValueError, match="pass a sensor's result use prediction=wait.output"):
        persist(str(fake_prediction(["http://127.0.0.1:9/x.png"])), dest)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_bytes": 0}, "max_bytes"),
        ({"timeout": (1, 2, 3)}, "timeout"),
        ({"timeout": -1}, "timeout"),
        ({"download_retries": -1}, "download_retries"),
        ({"prediction": "../x"}, "prediction must be a prediction object or a prediction id"),
        ({"expected_content_types": []}, "expected_content_types"),
    ],
)
def test_bad_arguments_fail_at_parse_time(kwargs, message):
    arguments = {"task_id": "p", "prediction": "{{ ti.xcom_pull('wait') }}", "destination": "/tmp/x", **kwargs}
    with pytest.raises(ValueError, match=message):
        PersistPredictionOutputOperator(**arguments)


@pytest.mark.parametrize("destination", ["relative/folder", "https://example.com/up/", ""])
def test_unusable_destinations_are_refused(sim, destination):
    prediction = succeeded(sim)
    with pytest.raises(ValueError, match="destination"):
        PersistPredictionOutputOperator(task_id="p", prediction=prediction, destination=destination).execute({})
    assert sim.delivery_requests() == []


# -- a whole mapped pipeline with dag.test() ------------------------------------------------------------------


def test_mapped_pipeline_with_dag_test_records_the_asset(sim, tmp_path):
    from airflow.providers.common.compat.sdk import Asset

    from airflow_comet.operators.prediction import CreatePredictionOperator
    from airflow_comet.sensors.prediction import PredictionSensor
    from tests.dagrun import AIRFLOW_3, DAG, run, states, xcom

    out = tmp_path / "images"
    asset = Asset(out.as_uri())
    prompts = ["a red lighthouse", "a fox in a cafe"]
    with DAG("t_persist_mapped", start_date=datetime(2026, 1, 1), schedule=None, catchup=False) as dag:
        create = CreatePredictionOperator.partial(task_id="create", model=FLUX).expand(
            input=[{"prompt": p, "output_format": "png"} for p in prompts]
        )
        wait = PredictionSensor.partial(task_id="wait", deferrable=True, timeout=60).expand(prediction_id=create.output)
        PersistPredictionOutputOperator.partial(
            task_id="persist", destination=out.as_uri() + "/{{ ds }}/", outlets=[asset], retry_backoff=0.01
        ).expand(prediction=wait.output)

    if not AIRFLOW_3:
        dag.sync_to_db()  # Airflow 2's dag.test() records dataset events only for datasets already in the DB
    dagrun = run(dag)

    assert states(dagrun) == {f"{t}[{i}]": "success" for t in ("create", "wait", "persist") for i in (0, 1)}
    ids = [xcom(dagrun, "create", map_index=i) for i in (0, 1)]
    written = []
    for i, pid in enumerate(ids):
        [record] = xcom(dagrun, "persist", map_index=i)
        assert record["prediction_id"] == pid and record["index"] == 0
        path = Path(record["path"].removeprefix("file://"))
        assert path.name == f"{pid}-0.png" and path.parent.parent == out
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
        written.append(path)
    # Exactly the two images, in the rendered {{ ds }} folder, and nothing else.
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(written)
    assert len({p.parent for p in written}) == 1 and written[0].parent.name == str(dagrun.logical_date.date())
    assert all(API_KEY not in json.dumps(r.headers) for r in sim.delivery_requests())

    events = asset_events(asset.uri)
    assert len(events) == 2
    assert sorted(e["prediction_id"] for e in events) == sorted(ids)
    assert sorted(f["path"] for e in events for f in e["files"]) == sorted(f"file://{p}" for p in written)


def asset_events(uri: str) -> list[dict[str, Any]]:
    """The ``extra`` of every asset (dataset) event recorded for ``uri``."""
    from airflow.utils.session import create_session
    from sqlalchemy import select

    try:
        from airflow.models.asset import AssetEvent, AssetModel

        event, model, key = AssetEvent, AssetModel, "asset_id"
    except ImportError:  # Airflow 2: datasets
        from airflow.models.dataset import DatasetEvent, DatasetModel

        event, model, key = DatasetEvent, DatasetModel, "dataset_id"
    with create_session() as session:
        query = select(event.extra).join(model, getattr(event, key) == model.id).where(model.uri == uri)
        return [dict(row) for row in session.scalars(query)]
