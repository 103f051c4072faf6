"""Turn local image files given in a model input into ``data:`` URIs CometAPI can take.

Image-editing models (e.g. ``black-forest-labs/flux-kontext-pro``) take ``input_image`` (and some
``input_images``) as an http(s) URL or a ``data:`` URI. A pipeline usually has the image as a file it
just wrote, so :func:`resolve_file_inputs` reads such files and inlines them; URLs and ``data:`` URIs
pass through untouched.
"""

from __future__ import annotations

import base64
import mimetypes
import os
import pathlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from airflow.providers.common.compat.sdk import ObjectStoragePath

__all__ = ["DEFAULT_MAX_BYTES", "FILE_INPUT_KEYS", "file_input_paths", "media_type_of", "resolve_file_inputs"]

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
#: The input keys that may hold image files; nothing else in the input is ever read or changed.
FILE_INPUT_KEYS = ("input_image", "input_images")
_PASS_THROUGH = ("http://", "https://", "data:")
#: Media types recognised by their first bytes; for these the file name is never enough.
_SNIFFED = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})


def resolve_file_inputs(input: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """A copy of ``input`` where ``input_image`` and the items of ``input_images`` that name files are
    replaced by ``data:<media type>;base64,...`` URIs.

    A file is a ``str`` starting with ``/`` or ``file://``, a ``pathlib.Path``, an ``ObjectStoragePath``,
    or a ``str`` URL of another object store (``s3://...``, read through Airflow's object storage). http(s)
    URLs and ``data:`` URIs are kept as they are. The media type comes from the file's first bytes (PNG,
    JPEG, WebP, GIF), else from its extension (``image/*`` only).

    :raises ValueError: naming the key and the path, when a file is missing, too large (``max_bytes``),
        empty, or not an image.
    """
    if not isinstance(input, Mapping):
        raise ValueError(f"input must be a dict of model parameters, got {type(input).__name__}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
    resolved = dict(input)
    if resolved.get("input_image") is not None:
        resolved["input_image"] = _resolve(resolved["input_image"], "input_image", max_bytes)
    images = resolved.get("input_images")
    if images is not None:
        if isinstance(images, (str, bytes, Mapping)) or not isinstance(images, (list, tuple)):
            raise ValueError(f"input_images must be a list of images, got {type(images).__name__}")
        resolved["input_images"] = [_resolve(item, f"input_images[{i}]", max_bytes) for i, item in enumerate(images)]
    return resolved


def file_input_paths(input: Mapping[str, Any]) -> list[Any]:
    """The values of ``input`` that :func:`resolve_file_inputs` reads as files (for lineage), in order."""
    if not isinstance(input, Mapping):
        return []
    images = input.get("input_images")
    values = [input.get("input_image"), *(images if isinstance(images, (list, tuple)) else ())]
    return [
        value
        for value in values
        if value is not None and not (isinstance(value, str) and value.strip().lower().startswith(_PASS_THROUGH))
    ]


def media_type_of(head: bytes, name: str) -> str | None:
    """The image media type from magic bytes, else from the file name's extension (``image/*`` only)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    guessed, _ = mimetypes.guess_type(name)
    # A .png/.jpg/.webp/.gif name on bytes without that magic is not that image: never trust the name then.
    if not guessed or not guessed.startswith("image/") or guessed in _SNIFFED:
        return None
    return guessed


def _resolve(value: Any, key: str, max_bytes: int) -> Any:
    if isinstance(value, str) and value.strip().lower().startswith(_PASS_THROUGH):
        return value
    data, shown = _read(value, key, max_bytes)
    media_type = media_type_of(data[:16], shown)
    if media_type is None:
        raise ValueError(
            f"{key}: {shown} is not a PNG, JPEG, WebP or GIF image (by its first bytes), and its extension "
            "names no other image type"
        )
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _read(value: Any, key: str, max_bytes: int) -> tuple[bytes, str]:
    """The file's bytes and how to name it in errors; at most ``max_bytes`` are ever read."""
    if isinstance(value, ObjectStoragePath):
        return _read_storage(value, key, max_bytes)
    if isinstance(value, pathlib.PurePath):
        return _read_local(str(value), key, max_bytes)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("/"):
            return _read_local(text, key, max_bytes)
        scheme = urlsplit(text).scheme.lower()
        if scheme == "file":
            return _read_local(_file_url_path(text, key), key, max_bytes)
        if scheme and text[len(scheme) : len(scheme) + 3] == "://":
            return _read_storage(_storage_path(text, key), key, max_bytes)
        raise ValueError(
            f"{key} must be an http(s) URL, a data: URI, an absolute path or a file:// URL, got {text[:80]!r}"
        )
    raise ValueError(f"{key} must be a URL, a data: URI, a path or an ObjectStoragePath, got {type(value).__name__}")


def _read_local(path: str, key: str, max_bytes: int) -> tuple[bytes, str]:
    if not os.path.isabs(path):
        raise ValueError(f"{key}: {path!r} must be an absolute path")
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            _check_size(size, key, path, max_bytes)
            # Read one byte more than allowed: a file that grew since fstat is still caught.
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise ValueError(f"{key}: file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{key}: {path} is a directory, not an image file") from None
    except PermissionError:
        raise ValueError(f"{key}: file {path} cannot be read (permission denied)") from None
    _check_size(len(data), key, path, max_bytes)
    return data, path


def _read_storage(path: ObjectStoragePath, key: str, max_bytes: int) -> tuple[bytes, str]:
    shown = str(path)
    problem: str | None = None
    size: int | None = None
    try:
        if path.is_file():
            size = path.stat().st_size
        else:
            problem = "is a directory, not an image file" if path.exists() else "does not exist"
    except FileNotFoundError:
        problem = "does not exist"
    except Exception as error:  # noqa: BLE001 - an unknown scheme or a missing connection: fsspec raises many types
        raise ValueError(f"{key}: cannot read {shown} through Airflow object storage: {error}") from None
    if problem:
        raise ValueError(f"{key}: {shown} {problem}")
    _check_size(size, key, shown, max_bytes)
    with path.open("rb") as handle:
        # One byte more than allowed: a file that grew since stat() is still caught.
        data = handle.read(max_bytes + 1)
    _check_size(len(data), key, shown, max_bytes)
    return data, shown


def _check_size(size: int | None, key: str, shown: str, max_bytes: int) -> None:
    if size is None:
        return
    if size > max_bytes:
        raise ValueError(f"{key}: {shown} is {size} bytes, over the limit of {max_bytes} bytes (max_bytes)")
    if size == 0:
        raise ValueError(f"{key}: {shown} is empty")


def _file_url_path(url: str, key: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{key}: {url[:80]!r} names another host; a file:// URL must be file:///absolute/path")
    return unquote(parts.path)


def _storage_path(url: str, key: str) -> ObjectStoragePath:
    try:
        return ObjectStoragePath(url)
    except Exception as error:  # noqa: BLE001 - an unknown scheme: fsspec/Airflow raise various types
        raise ValueError(f"{key}: cannot open {url[:80]!r} through Airflow object storage: {error}") from None
