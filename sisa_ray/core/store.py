"""Durable storage behind a ``pyarrow.fs`` URI: a local path, ``file://``, ``s3://``, ``gs://``.

Writes of whole objects are atomic: on a local file system a temporary file is written, fsynced
and renamed over the target (then the directory is fsynced); on object stores a single PUT is
already all-or-nothing. Nothing is ever appended in place, so the same code works on both.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StoreError(RuntimeError):
    """A store is missing, unreadable or inconsistent. The message says how to recover."""


class Store:
    """A directory of objects addressed by relative POSIX paths.

    Parameters
    ----------
    uri : a local path or any URI ``pyarrow.fs.FileSystem.from_uri`` understands.
    """

    def __init__(self, uri: str) -> None:
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"The store must be a non-empty path or URI string. Got {uri!r}.")
        self.uri = uri
        if "://" in uri:
            self.fs, root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, root = pafs.LocalFileSystem(), os.path.abspath(uri)
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __reduce__(self):  # file systems are re-created from the URI in other processes
        return (Store, (self.uri,))

    @property
    def location(self) -> str:
        """Where the store lives, as a user would type it."""
        return self.root if self.is_local else self.uri

    def _full(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    # -- reading -----------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._full(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self._full(rel)) as f:
                return f.read()
        except FileNotFoundError as e:
            raise StoreError(f"{self.location}: missing object '{rel}'.") from e

    def read_json(self, rel: str) -> Any:
        raw = self.read_bytes(rel)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise StoreError(
                f"{self.location}: '{rel}' is not valid JSON (truncated or corrupt write?)."
            ) from e

    def read_table(self, rel: str) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.read_bytes(rel)))

    def list(self, rel_dir: str) -> list[str]:
        """Relative paths of all files under ``rel_dir`` (recursive), sorted."""
        selector = pafs.FileSelector(self._full(rel_dir), recursive=True, allow_not_found=True)
        prefix = self.root + "/"
        out = [
            info.path[len(prefix):] if info.path.startswith(prefix) else info.path
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File
        ]
        return sorted(out)

    # -- writing -----------------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically: readers see the old object or the new, whole."""
        full = self._full(rel)
        if self.is_local:
            directory = os.path.dirname(full)
            os.makedirs(directory, exist_ok=True)
            tmp = f"{full}.tmp-{uuid.uuid4().hex[:8]}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, full)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            _fsync_dir(directory)
        else:
            self.fs.create_dir(posixpath.dirname(full), recursive=True)
            with self.fs.open_output_stream(full) as f:
                f.write(data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist yet; return whether this call created it.

        Local file systems get a true exclusive create (``O_EXCL`` on a fully written temporary,
        linked into place); on object stores this is check-then-put.
        """
        if not self.is_local:
            if self.exists(rel):
                return False
            self.write_bytes(rel, data)
            return True
        full = self._full(rel)
        directory = os.path.dirname(full)
        os.makedirs(directory, exist_ok=True)
        tmp = f"{full}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, full)  # fails if the target exists: never overwrites
            created = True
        except FileExistsError:
            created = False
        finally:
            os.unlink(tmp)
        _fsync_dir(directory)
        return created

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def write_table(self, rel: str, table: pa.Table) -> None:
        sink = io.BytesIO()
        pq.write_table(table, sink)
        self.write_bytes(rel, sink.getvalue())

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self._full(rel))
        except FileNotFoundError:
            pass

    def is_empty(self) -> bool:
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return True
        return not self.list("")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
