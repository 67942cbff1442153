"""Durable storage behind a ``pyarrow.fs`` URI: a local path, ``file://``, ``s3://``, ``gs://``.

Writes of whole objects are atomic: on a local file system a temporary file is written, fsynced
and renamed over the target (then the directory is fsynced); on object stores a single PUT is
already all-or-nothing. Nothing is ever appended in place, so the same code works on both.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import threading
import time
import urllib.parse
import uuid
from typing import Any

import filelock
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``: how the manifest names the exact bytes of every file it points to."""
    return hashlib.sha256(data).hexdigest()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


class StoreError(RuntimeError):
    """A store is missing, unreadable or inconsistent. The message says how to recover."""


#: how long a gs:// request retries before it fails (pyarrow's default is 15 minutes, so a
#: store without credentials or network hung that long)
GCS_RETRY_LIMIT_S = 20


def _with_retry_limit(uri: str) -> str:
    """``uri`` with a bounded retry time for GCS, unless the URI sets one itself."""
    if not uri.startswith("gs://") or "retry_limit_seconds=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}retry_limit_seconds={GCS_RETRY_LIMIT_S}"


class Store:
    """A directory of objects addressed by relative POSIX paths.

    Parameters
    ----------
    uri : a local path or any URI ``pyarrow.fs.FileSystem.from_uri`` understands.
    """

    def __init__(self, uri: str) -> None:
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"The store must be a non-empty path or URI string. Got {uri!r}.")
        if "://" in uri:
            self.fs, root = pafs.FileSystem.from_uri(_with_retry_limit(uri))
        else:
            # resolved here, so workers on other nodes (other working directories) get the
            # absolute path and every spelling of one store names the same workers
            self.fs, root = pafs.LocalFileSystem(), os.path.abspath(uri)
            uri = root
        self.uri = uri
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

    def size(self, rel: str) -> int:
        return self.fs.get_file_info(self._full(rel)).size or 0

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._full(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self._full(rel)) as f:
                return f.read()
        except FileNotFoundError as e:
            raise StoreError(f"{self.location}: missing object '{rel}'.") from e

    def read_optional(self, rel: str) -> bytes | None:
        """The object's bytes, or None when it does not exist (one request, no existence check)."""
        try:
            with self.fs.open_input_stream(self._full(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_json(self, rel: str, raw: bytes | None = None) -> Any:
        raw = self.read_bytes(rel) if raw is None else raw
        try:
            return json.loads(raw)
        except ValueError as e:
            raise StoreError(
                f"{self.location}: '{rel}' is not valid JSON (truncated or corrupt write?)."
            ) from e

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.read_bytes(rel)), columns=columns)

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

    def _temporary(self, full: str) -> str:
        """A fresh temporary path for an atomic local write. Temporaries live in one folder of
        the store (same file system, so the final rename or link is atomic), where a writer
        finds and removes those a crash left without listing the rest of the store."""
        _makedirs_durable(posixpath.join(self.root, TMP_DIR))
        name = f"{posixpath.basename(full)}.tmp-{uuid.uuid4().hex[:8]}"
        return posixpath.join(self.root, TMP_DIR, name)

    def clear_temporaries(self, min_age_s: float = 600.0) -> list[str]:
        """Remove temporaries of interrupted writes. A write's temporary lives for milliseconds,
        so one older than ``min_age_s`` was left by a crash (younger ones may belong to a write
        in flight, e.g. a worker's checkpoint)."""
        if not self.is_local:
            return []  # object store writes are single PUTs: nothing is ever left half-written
        now = time.time()
        old = [rel for rel in self.list(TMP_DIR)
               if now - os.path.getmtime(self._full(rel)) > min_age_s]
        for rel in old:
            self.delete(rel)
        return old

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically: readers see the old object or the new, whole."""
        full = self._full(rel)
        if self.is_local:
            directory = os.path.dirname(full)
            _makedirs_durable(directory)
            tmp = self._temporary(full)
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
            # no create_dir: object stores have no folders, and its marker objects would pile
            # up with every version written
            with self.fs.open_output_stream(full) as f:
                f.write(data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist yet; return whether this call created it.

        Local file systems get a true exclusive create (``O_EXCL`` on a fully written temporary,
        linked into place); object stores get a conditional PUT (S3 ``If-None-Match: *``, GCS
        ``ifGenerationMatch=0``), which the store itself decides atomically.
        """
        if not self.is_local:
            return self._remote().replace_if(rel, data, None)
        full = self._full(rel)
        directory = os.path.dirname(full)
        _makedirs_durable(directory)
        tmp = self._temporary(full)
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

    def read_tagged(self, rel: str) -> tuple[bytes | None, str | None]:
        """An object's bytes and a version tag that changes whenever the object is replaced
        (``(None, None)`` when it does not exist). Pass the tag to :meth:`replace_if`."""
        if not self.is_local:
            return self._remote().read_tagged(rel)
        try:
            data = self.read_bytes(rel)
        except StoreError:
            return None, None
        return data, sha256(data)

    def replace_if(self, rel: str, data: bytes, tag: str | None) -> bool:
        """Atomically replace ``rel`` with ``data`` only if its version tag is still ``tag``
        (``None``: only if it does not exist). Returns whether it was replaced.

        Local stores compare under the writer lock, which callers hold; object stores use the
        store's own conditional writes, so a writer whose lease was taken over cannot win.
        """
        if not self.is_local:
            return self._remote().replace_if(rel, data, tag)
        if self.read_tagged(rel)[1] != tag:
            return False
        self.write_bytes(rel, data)
        return True

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def write_table(self, rel: str, table: pa.Table) -> str:
        """Write ``table`` as Parquet; return the SHA-256 of the bytes written."""
        blob = parquet_bytes(table)
        self.write_bytes(rel, blob)
        return sha256(blob)

    def beside(self, suffix: str) -> str:
        """The URI of a location next to this store (``<store><suffix>``): on the same file
        system or bucket, so wherever the store is shared storage, so is it."""
        base, sep, query = self.uri.partition("?")
        return f"{base.rstrip('/')}{suffix}{sep}{query}"

    def remove(self) -> None:
        """Delete the whole store (a scratch store that has served its purpose)."""
        try:
            self.fs.delete_dir(self.root)
        except FileNotFoundError:
            pass

    def delete_empty_dirs(self, rel_dirs: list[str]) -> None:
        """Remove these folders where they are empty (local stores; object stores have none)."""
        if not self.is_local:
            return
        for rel in rel_dirs:
            try:
                os.rmdir(self._full(rel))
            except OSError:  # not empty, or gone already
                pass

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self._full(rel))
        except FileNotFoundError:
            pass

    def check_usable(self) -> None:
        """Refuse a location that cannot be a store (a file where a directory belongs)."""
        if self.fs.get_file_info(self.root).type == pafs.FileType.File:
            raise StoreError(
                f"The store {self.location} is a file; a store is a directory. Give the path of "
                "a new or existing store directory."
            )

    def is_empty(self) -> bool:
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return True
        return not [p for p in self.list("") if p != LOCK_FILE and not p.startswith(TMP_DIR)]

    def writer_lock(self, timeout: float = 3600.0, lease_s: float = 60.0) -> WriterLock:
        """Exclusive lock for everything that changes the store (fit, deletions, recovery).

        It excludes other processes, other threads and other handles of this process alike, and
        is not re-entrant: code that holds it passes it down instead of taking it again.
        """
        if self.is_local:
            return LocalLock(self, timeout)
        from .lease import ObjectLease

        return ObjectLease(self, timeout, lease_s)

    def _remote(self) -> ConditionalWrites:
        """The conditional writes of this object store (a client made once per process)."""
        cached = self.__dict__.get("_conditional")
        if cached is None or cached[0] != os.getpid():  # clients do not survive a fork
            with _CLIENT_INIT:
                cached = self.__dict__.get("_conditional")
                if cached is None or cached[0] != os.getpid():
                    kinds = {"s3": S3ConditionalWrites, "gcs": GCSConditionalWrites}
                    kind = kinds.get(self.fs.type_name)
                    if kind is None:
                        raise StoreError(
                            f"{self.location}: a '{self.fs.type_name}' store cannot do the "
                            "conditional writes the writer lock needs; use a local path, s3:// "
                            "or gs://."
                        )
                    cached = self._conditional = (os.getpid(), kind(self))
        return cached[1]


LOCK_FILE = ".lock"
TMP_DIR = ".tmp"


class LockTimeout(StoreError):
    """Another writer held the lock for longer than the caller was willing to wait."""


class LeaseLost(StoreError):
    """This writer's lease on an object store expired or was taken over; it must stop writing."""


class WriterLock:
    """What every writer lock offers: a context manager, a fencing token, and a liveness check.

    ``token`` grows with every acquisition of the store's lock, so a write stamped with an older
    token is recognisably stale; ``check()`` raises :class:`LeaseLost` when this holder may no
    longer write (always fine for a kernel lock, which cannot expire while its holder lives).
    """

    token: int = 0

    def check(self) -> None:
        return None

    def __enter__(self) -> WriterLock:
        raise NotImplementedError

    def __exit__(self, *exc) -> None:
        raise NotImplementedError


class LocalLock(WriterLock):
    """``filelock.FileLock`` (``flock``) on ``<store>/.lock``, one lock object per acquisition.

    ``flock`` locks belong to an open file description and every acquisition opens the file anew,
    so a second handle in the same process (another thread, another ``Store``) conflicts exactly
    like another process does. The kernel releases the lock when the holder dies, even by
    SIGKILL, so a crashed writer never blocks the next one: hence no fallback to a "soft" lock
    file, which would outlive a killed holder. ``filelock`` locks are re-entrant; this one is not
    (a writer that takes its own lock twice has a bug). The lock file stays in place.
    """

    def __init__(self, store: Store, timeout: float = 3600.0) -> None:
        self.store, self.timeout = store, timeout
        self._lock: filelock.FileLock | None = None

    def __enter__(self) -> LocalLock:
        if self._lock is not None:
            raise RuntimeError("This writer lock is already held; it is not re-entrant.")
        _makedirs_durable(self.store.root)
        # fallback_to_soft=False: on a file system without flock, fail rather than use a lock
        # file that a killed holder would leave behind
        lock = filelock.FileLock(
            os.path.join(self.store.root, LOCK_FILE), mode=0o644, thread_local=False,
            fallback_to_soft=False, poll_interval=0.02,
        )
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            log.info("waiting for the writer lock of %s", self.store.location)
            try:
                lock.acquire(timeout=self.timeout)
            except filelock.Timeout:
                raise LockTimeout(
                    f"{self.store.location} is locked by another sisa-ray writer (a training "
                    "or deletion in progress). Wait for it to finish and try again."
                ) from None
        self._lock = lock
        return self

    def __exit__(self, *exc) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release(force=True)


# -- object stores: conditional writes ---------------------------------------------------------------
# pyarrow's file systems cannot make a write conditional, so the few objects that need it (the
# lease, ledger events) go through the store's own client. Everything else stays on pyarrow.

_CLIENT_INIT = threading.Lock()


class ConditionalWrites:
    """Conditional reads and writes of one object store, addressed like :class:`Store`.

    A *tag* names one version of an object (an S3 ETag, a GCS generation): it changes whenever
    the object is replaced, and the store itself refuses a write whose tag no longer matches.
    """

    def __init__(self, store: Store) -> None:
        self.location = store.location
        self.bucket, _, self.prefix = store.root.partition("/")

    def _key(self, rel: str) -> str:
        return posixpath.join(self.prefix, rel) if self.prefix else rel

    def read_tagged(self, rel: str) -> tuple[bytes | None, str | None]:
        """The object's bytes and tag, read in one request; ``(None, None)`` when absent."""
        raise NotImplementedError

    def put_if(self, rel: str, data: bytes, tag: str | None) -> str | None:
        """Write ``data`` only if the object's tag is still ``tag`` (``None``: only if absent).
        Returns the new object's tag, or ``None`` when the precondition failed."""
        raise NotImplementedError

    def replace_if(self, rel: str, data: bytes, tag: str | None) -> bool:
        return self.put_if(rel, data, tag) is not None

    def _no_bucket(self) -> StoreError:
        return StoreError(
            f"{self.location}: the bucket '{self.bucket}' does not exist. Create it first, "
            "then run the command again."
        )


class S3ConditionalWrites(ConditionalWrites):
    """S3 through boto3: ``PutObject`` with ``If-None-Match: *`` or ``If-Match: <ETag>``.

    The endpoint and region come from the store URI's query (``endpoint_override``, ``scheme``,
    ``region``), as pyarrow reads them; credentials from the standard AWS environment variables
    and config files, or the URI's ``access_key``/``secret_key``/``session_token``.
    """

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        try:
            import boto3
            import botocore.config
            import botocore.exceptions
        except ImportError:
            raise StoreError(
                f"{self.location}: s3:// stores need boto3 for their writer lock: "
                "pip install 'sisa-ray[s3]'"
            ) from None
        self._errors = botocore.exceptions
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(store.uri).query))
        endpoint = query.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        session = boto3.session.Session(
            aws_access_key_id=query.get("access_key"),
            aws_secret_access_key=query.get("secret_key"),
            aws_session_token=query.get("session_token"),
            region_name=query.get("region"),
        )
        # pyarrow addresses buckets path-style whenever an endpoint is given; so do we
        config = botocore.config.Config(
            s3={"addressing_style": "path"} if endpoint else {}, retries={"mode": "standard"}
        )
        self.client = session.client("s3", endpoint_url=endpoint, config=config)

    def read_tagged(self, rel: str) -> tuple[bytes | None, str | None]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
            return resp["Body"].read(), resp["ETag"]
        except self._errors.ClientError as e:
            if _s3_code(e) in ("NoSuchKey", "404"):
                return None, None
            raise self._error(e, "read", rel) from None
        except self._errors.BotoCoreError as e:
            raise self._error(e, "read", rel) from None

    def put_if(self, rel: str, data: bytes, tag: str | None) -> str | None:
        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data,
                                          **condition)
            return resp["ETag"]
        except self._errors.ClientError as e:
            # 412: the precondition failed; 409: a concurrent conditional write won the race;
            # 404 with If-Match: the object it names is gone
            if _s3_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409",
                               "NoSuchKey", "404"):
                return None
            raise self._error(e, "conditional write", rel) from None
        except self._errors.BotoCoreError as e:
            raise self._error(e, "conditional write", rel) from None

    def _error(self, e: Exception, what: str, rel: str) -> StoreError:
        if isinstance(e, self._errors.ClientError):
            code = _s3_code(e)
            if code == "NoSuchBucket":
                return self._no_bucket()
            if code == "NotImplemented":
                return StoreError(
                    f"{self.location}: this S3 server does not support conditional writes "
                    "(If-None-Match / If-Match on PutObject), which the writer lock needs."
                )
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StoreError(
                    f"{self.location}: S3 refused the {what} of '{rel}' ({code}); check the AWS "
                    "credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and their permissions."
                )
            message = e.response.get("Error", {}).get("Message", "")
            return StoreError(f"{self.location}: S3 {what} of '{rel}' failed: {code} {message}".strip())
        return StoreError(f"{self.location}: S3 {what} of '{rel}' failed: {e}")


def _s3_code(e) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


class GCSConditionalWrites(ConditionalWrites):
    """Google Cloud Storage through ``google.cloud.storage``: generation preconditions
    (``if_generation_match=0`` creates, ``=<generation>`` replaces). Credentials are the
    application default ones; ``endpoint_override`` in the URI picks another endpoint."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        try:
            from google.api_core import exceptions
            from google.cloud import storage
        except ImportError:
            raise StoreError(
                f"{self.location}: gs:// stores need google-cloud-storage for their writer lock: "
                "pip install google-cloud-storage"
            ) from None
        self._errors = exceptions
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(store.uri).query))
        endpoint = query.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        options = {"api_endpoint": endpoint} if endpoint else None
        self._bucket = storage.Client(client_options=options).bucket(self.bucket)

    def read_tagged(self, rel: str) -> tuple[bytes | None, str | None]:
        blob = self._bucket.blob(self._key(rel))  # a fresh Blob: it reads the live generation
        try:
            data = blob.download_as_bytes()
        except self._errors.NotFound:
            if not self._bucket.exists():
                raise self._no_bucket() from None
            return None, None
        except self._errors.GoogleAPIError as e:
            raise StoreError(f"{self.location}: GCS read of '{rel}' failed: {e}") from None
        return data, str(blob.generation)

    def put_if(self, rel: str, data: bytes, tag: str | None) -> str | None:
        blob = self._bucket.blob(self._key(rel))
        try:
            blob.upload_from_string(data, content_type="application/octet-stream",
                                    if_generation_match=0 if tag is None else int(tag))
        except self._errors.PreconditionFailed:
            return None
        except self._errors.NotFound:
            raise self._no_bucket() from None
        except self._errors.GoogleAPIError as e:
            raise StoreError(
                f"{self.location}: GCS conditional write of '{rel}' failed: {e}"
            ) from None
        return str(blob.generation)


def _makedirs_durable(directory: str) -> None:
    """``os.makedirs`` that also fsyncs each new directory's parent, so the entry survives a crash."""
    missing = []
    d = directory
    while d and not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    if not missing:
        return
    os.makedirs(directory, exist_ok=True)
    for d in reversed(missing):
        _fsync_dir(os.path.dirname(d))


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
