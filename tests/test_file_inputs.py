"""resolve_file_inputs: local image files in a model input become data: URIs; nothing else changes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from airflow_comet.file_inputs import media_type_of, resolve_file_inputs
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.testing.images import render_image

KONTEXT = "black-forest-labs/flux-kontext-pro"


def image(fmt: str = "png") -> bytes:
    return render_image("input", width=32, height=32, output_format=fmt)


def decode(uri: str) -> tuple[str, bytes]:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:") and header.endswith(";base64"), header
    return header[len("data:") : -len(";base64")], base64.b64decode(payload, validate=True)


@pytest.fixture
def png(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(image("png"))
    return path


@pytest.mark.parametrize("form", ["str", "file_url", "path", "storage_path"])
def test_every_local_form_becomes_a_data_uri_of_the_same_bytes(png, form):
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    value = {
        "str": str(png),
        "file_url": png.as_uri(),
        "path": png,
        "storage_path": ObjectStoragePath(png.as_uri()),
    }[form]
    resolved = resolve_file_inputs({"prompt": "make it blue", "input_image": value})
    assert decode(resolved["input_image"]) == ("image/png", png.read_bytes())
    assert resolved["prompt"] == "make it blue"


@pytest.mark.parametrize(("fmt", "media_type"), [("png", "image/png"), ("jpg", "image/jpeg"), ("webp", "image/webp")])
def test_media_type_comes_from_the_bytes_not_the_name(tmp_path, fmt, media_type):
    path = tmp_path / "misnamed.gif"  # the extension lies; the magic bytes win
    path.write_bytes(image(fmt))
    assert decode(resolve_file_inputs({"input_image": str(path)})["input_image"])[0] == media_type


def test_gif_magic_and_extension_fallback(tmp_path):
    assert media_type_of(b"GIF89a\x01\x00", "x") == "image/gif"
    bmp = tmp_path / "scan.bmp"
    bmp.write_bytes(b"BM" + bytes(64))  # no magic we know: the extension decides
    assert decode(resolve_file_inputs({"input_image": str(bmp)})["input_image"])[0] == "image/bmp"


@pytest.mark.parametrize("name", ["notes.txt", "secret.png", "key.jpg", "noextension"])
def test_not_an_image_is_refused_naming_key_and_path(tmp_path, name):
    # A .png name does not make text a PNG: only the bytes count for the types they can identify.
    path = tmp_path / name
    path.write_text("-----BEGIN PRIVATE KEY-----")
    with pytest.raises(ValueError, match=rf"input_image: {path} is not a PNG, JPEG, WebP or GIF image"):
        resolve_file_inputs({"input_image": str(path)})


def test_urls_and_data_uris_pass_through_and_other_keys_are_untouched(png):
    data_uri = "data:image/png;base64,iVBORw0KGgo="
    source = {
        "prompt": str(png),  # a path in another key is just text
        "mask": str(png),
        "input_image": "https://cdn.example.com/a.png",
        "input_images": [data_uri, "HTTP://cdn.example.com/b.webp", png],
    }
    resolved = resolve_file_inputs(source)
    assert resolved["prompt"] == resolved["mask"] == str(png)
    assert resolved["input_image"] == "https://cdn.example.com/a.png"
    assert resolved["input_images"][:2] == [data_uri, "HTTP://cdn.example.com/b.webp"]
    assert decode(resolved["input_images"][2]) == ("image/png", png.read_bytes())
    assert source["input_images"][2] == png, "the caller's input must not be changed"


def test_input_without_file_keys_is_an_equal_copy():
    source = {"prompt": "x", "seed": 3}
    resolved = resolve_file_inputs(source)
    assert resolved == source and resolved is not source


def test_too_large_names_key_path_and_limit(png):
    size = png.stat().st_size
    with pytest.raises(ValueError, match=rf"input_images\[1\]: {png} is {size} bytes, over the limit of 100 bytes"):
        resolve_file_inputs({"input_images": ["https://x/y.png", str(png)]}, max_bytes=100)
    assert resolve_file_inputs({"input_image": str(png)}, max_bytes=size)["input_image"].startswith("data:image/png")


@pytest.mark.parametrize("form", ["str", "path", "storage_path"])
def test_missing_file_names_key_and_path(tmp_path, form):
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    missing = tmp_path / "gone.png"
    value = {"str": str(missing), "path": missing, "storage_path": ObjectStoragePath(missing.as_uri())}[form]
    with pytest.raises(ValueError, match=r"input_image: .*gone\.png does not exist"):
        resolve_file_inputs({"input_image": value})


def test_empty_file_and_directory_are_refused(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        resolve_file_inputs({"input_image": str(empty)})
    with pytest.raises(ValueError, match="is a directory"):
        resolve_file_inputs({"input_image": str(tmp_path)})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("photo.png", "must be an http\\(s\\) URL, a data: URI, an absolute path or a file:// URL"),
        ("file://otherhost/x.png", "names another host"),
        (42, "got int"),
    ],
)
def test_unusable_values_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        resolve_file_inputs({"input_image": value})


def test_input_images_must_be_a_list(png):
    with pytest.raises(ValueError, match="input_images must be a list"):
        resolve_file_inputs({"input_images": str(png)})


def test_the_simulator_accepts_the_resolved_input(sim, png):
    """The data: URI goes through the hook to an image-editing model and arrives intact."""
    resolved = resolve_file_inputs(
        {"prompt": "make the sky green", "input_image": png, "aspect_ratio": "match_input_image"}
    )
    json.dumps(resolved)  # what the hook sends must be plain JSON

    prediction = CometAPIHook().create_prediction(KONTEXT, resolved)

    [create] = sim.creates()
    assert create.status == 201 and create.model == KONTEXT
    received = sim.prediction(prediction["id"])["input"]["input_image"]
    assert decode(received) == ("image/png", png.read_bytes())


def test_the_simulator_refuses_an_unresolved_path(sim, png):
    # Why resolving is needed at all: the API takes only URLs and data: URIs.
    from airflow_comet.exceptions import CometAPIResponseError

    with pytest.raises(CometAPIResponseError, match="input_image"):
        CometAPIHook().create_prediction(KONTEXT, {"prompt": "x", "input_image": str(png)})
