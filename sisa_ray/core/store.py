"""Durable storage behind a ``pyarrow.fs`` URI: a local path, ``file://``, ``s3://``, ``gs://``.

Writes of whole objects are atomic: on a local file system a temporary file is written, fsynced
and renamed over the target (then the directory is fsynced); on object stores a single PUT is
already all-or-nothing. Nothing is ever appended in place, so the same code works on both.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import posixpath
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


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
        return not [p for p in self.list("") if p != LOCK_FILE]

    def writer_lock(self, timeout: float = 3600.0) -> StoreLock:
        """Exclusive lock for everything that changes the store (fit, deletions, recovery)."""
        return StoreLock(self, timeout)


LOCK_FILE = ".lock"


class StoreLock:
    """An exclusive, re-entrant (per process) writer lock on a store.

    Local stores use ``flock`` on ``<store>/.lock``: the kernel releases it when the holder dies,
    even by SIGKILL, so a crashed writer never blocks the next one. Object stores get a lease
    object ``.lock`` (exclusive create) that expires after ``lease_s`` seconds without renewal.
    """

    _held: dict[str, list] = {}  # root -> [count, handle]

    def __init__(self, store: Store, timeout: float = 3600.0, lease_s: float = 600.0) -> None:
        self.store, self.timeout, self.lease_s = store, timeout, lease_s

    def __enter__(self) -> StoreLock:
        key = self.store.uri if not self.store.is_local else self.store.root
        held = StoreLock._held.get(key)
        if held is not None:
            held[0] += 1
            return self
        deadline = time.monotonic() + self.timeout
        handle = self._acquire_local(deadline) if self.store.is_local else self._acquire_lease(
            deadline)
        StoreLock._held[key] = [1, handle]
        return self

    def __exit__(self, *exc) -> None:
        key = self.store.uri if not self.store.is_local else self.store.root
        held = StoreLock._held[key]
        held[0] -= 1
        if held[0] == 0:
            del StoreLock._held[key]
            if self.store.is_local:
                fcntl.flock(held[1], fcntl.LOCK_UN)
                os.close(held[1])
            else:
                self.store.delete(LOCK_FILE)

    def _acquire_local(self, deadline: float) -> int:
        os.makedirs(self.store.root, exist_ok=True)
        fd = os.open(os.path.join(self.store.root, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise StoreError(
                        f"{self.store.location} is locked by another sisa-ray writer (a training "
                        "or deletion in progress). Wait for it to finish and try again."
                    ) from None
                if not waited:
                    log.info("waiting for the writer lock of %s", self.store.location)
                    waited = True
                time.sleep(0.05)

    def _acquire_lease(self, deadline: float) -> None:
        while True:
            lease = json.dumps({"owner": uuid.uuid4().hex,
                                "expires": time.time() + self.lease_s}).encode()
            if self.store.create_exclusive(LOCK_FILE, lease):
                return None
            try:
                current = self.store.read_json(LOCK_FILE)
                if current.get("expires", 0) < time.time():
                    self.store.delete(LOCK_FILE)  # the holder died: take over its lease
                    continue
            except StoreError:
                continue
            if time.monotonic() > deadline:
                raise StoreError(
                    f"{self.store.location} is locked by another sisa-ray writer; try again later."
                )
            time.sleep(0.5)


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
