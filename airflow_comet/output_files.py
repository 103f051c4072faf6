"""Where output files go: names from the prediction id only, and atomic publishing to object storage.

A file is written aside first and published in one step once it has fully arrived:

* on a local folder (``file://`` or a plain absolute path) it is written to ``<folder>/.<name>.partial-<uuid>``
  on the same file system, then renamed over ``<folder>/<name>`` (``os.replace`` is atomic);
* anywhere else (``s3://``, ``gs://``, ...) it is written to a local temporary file, then uploaded with one
  ``put_file``: object stores only show an object once its upload has completed.

A failed download therefore never leaves a file under the destination. Only a killed worker can leave a
hidden ``.partial-`` file behind in a local folder; it is never mistaken for an output.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import uuid
from typing import Any, BinaryIO

from airflow.providers.common.compat.sdk import ObjectStoragePath

from airflow_comet.hooks._protocol import validate_prediction_id

__all__ = ["StagedFile", "destination_folder", "is_local", "output_stem"]

_LOCAL_PROTOCOLS = frozenset({"", "file", "local"})
_EXTENSION_RE = re.compile(r"^[a-z0-9]{1,10}$")
#: fsspec's read-only or pseudo file systems: nothing could be published there.
_REFUSED_PROTOCOLS = frozenset({"http", "https", "data", "memory"})


def output_stem(prediction_id: Any, index: int) -> str:
    """``<prediction id>-<index>``: the only text file names are made of (never the URL)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"output index must be a non-negative integer, got {index!r}")
    # The id's alphabet (letters, digits, '-', '_') cannot express '/', '..' or a drive letter.
    return f"{validate_prediction_id(prediction_id)}-{index}"


def destination_folder(destination: Any, conn_id: str | None = None) -> ObjectStoragePath:
    """The destination folder as an :class:`ObjectStoragePath` (``conn_id`` overrides one in the URL)."""
    if isinstance(destination, ObjectStoragePath):
        folder = ObjectStoragePath(str(destination), conn_id=conn_id) if conn_id else destination
    elif isinstance(destination, (str, os.PathLike)) and str(destination).strip():
        text = os.fspath(destination).strip()
        if "://" not in text and not os.path.isabs(text):
            # Checked on the text: Airflow 2's ObjectStoragePath silently makes "out" into "/out".
            raise ValueError(f"destination {text!r} must be an absolute path or a URL such as file:///data/images/")
        # conn_id=None must not be passed: on Airflow 2 it would hide a conn id given as s3://conn_id@bucket.
        folder = ObjectStoragePath(text, conn_id=conn_id) if conn_id else ObjectStoragePath(text)
    else:
        raise ValueError(
            "destination must be a folder URL such as 'file:///data/images/' or 's3://bucket/images/{{ ds }}/' "
            f"(or an ObjectStoragePath), got {type(destination).__name__}: {destination!r}"
        )
    protocol = (folder.protocol or "").lower()
    if protocol in _REFUSED_PROTOCOLS:
        raise ValueError(f"destination {str(folder)!r} uses {protocol!r}, which cannot store files")
    if is_local(folder) and not os.path.isabs(folder.path):
        raise ValueError(f"destination {str(folder)!r} must be an absolute path (or a file:/// URL)")
    return folder


def is_local(path: ObjectStoragePath) -> bool:
    return (path.protocol or "").lower() in _LOCAL_PROTOCOLS


class StagedFile:
    """One output file on its way to ``folder/<stem>.<extension>``.

    Use as a context manager: :meth:`open` once the extension is known, write, then :meth:`publish`.
    Leaving the block without publishing deletes what was written.
    """

    def __init__(self, folder: ObjectStoragePath, stem: str) -> None:
        self.folder = folder
        self.stem = stem
        self.target: ObjectStoragePath | None = None
        self._temp: str | None = None
        self._file: BinaryIO | None = None

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()

    def open(self, extension: str) -> BinaryIO:
        """Create the temporary file for ``<stem>.<extension>`` and return it open for writing."""
        if self._file is not None:
            raise RuntimeError("StagedFile.open() called twice")
        if not _EXTENSION_RE.match(extension):
            raise ValueError(f"file extension must be 1-10 lowercase letters or digits, got {extension!r}")
        name = f"{self.stem}.{extension}"
        self.target = self.folder / name
        if is_local(self.folder):
            directory = self.folder.path
            os.makedirs(directory, exist_ok=True)
            # Same directory, hence same file system: the final rename cannot turn into a copy.
            self._temp = os.path.join(directory, f".{name}.partial-{uuid.uuid4().hex}")
            self._file = open(self._temp, "xb")  # noqa: SIM115 - closed by publish()/discard()
        else:
            # The extension stays last so that the uploader can guess the object's Content-Type from it.
            fd, self._temp = tempfile.mkstemp(prefix=f"airflow-comet-{self.stem}-", suffix=f".{extension}")
            self._file = os.fdopen(fd, "wb")
        return self._file

    def publish(self) -> ObjectStoragePath:
        """Move the finished file under its final name (replacing an earlier one) and return that path."""
        if self._file is None or self._temp is None or self.target is None:
            raise RuntimeError("StagedFile.publish() before open()")
        self._file.flush()
        if is_local(self.folder):
            # Data on disk before the rename, so a crash cannot leave an empty file under the final name.
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._temp, self.target.path)
        else:
            self._file.close()
            self.target.fs.put_file(self._temp, self.target.path)
            os.unlink(self._temp)
        self._temp = None
        return self.target

    def discard(self) -> None:
        """Close and delete the temporary file, if any (safe to call twice)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp)
            self._temp = None
