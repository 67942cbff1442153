"""A real S3-compatible server for the tests: moto's server mode, in a subprocess, on 127.0.0.1.

``S3Server`` starts it on a free loopback port, waits until it answers, creates a bucket, and
hands out store URIs under a fresh prefix each. The ``s3_service`` fixture holds one for the
session, and ``s3`` points a test's environment at it. ``python tests/s3_server.py PORT`` is
what the subprocess runs.

moto checks a conditional PUT's precondition and then stores the object, in a threaded server
with no lock between the two; real S3 decides the pair atomically. The subprocess therefore runs
moto's WSGI app one request at a time (bodies are read before, replies sent after the critical
section), so the tests exercise our lock against the atomicity S3 promises, not moto's race.

The functions at the end run in the worker processes (``multiprocessing`` spawn) that contend
for a store in ``test_s3_store.py``; they live here because this module imports nothing heavy.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

BUCKET = "sisa-ray-test"
REGION = "us-east-1"
# the client side of the tests: fake credentials, and nothing read from the user's ~/.aws
CLIENT_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
CLIENT_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3")


class S3Server:
    """moto's S3 in a subprocess on ``127.0.0.1``; a context manager."""

    def __init__(self, start_timeout: float = 60.0) -> None:
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> S3Server:
        try:
            for _ in range(3):  # the free port may be taken between probing and binding
                if self._start():
                    self.client().create_bucket(Bucket=BUCKET)
                    return self
            raise RuntimeError(f"the S3 test server did not start: {self._log_tail()}")
        except BaseException:
            self._kill()
            raise

    def __exit__(self, *exc) -> None:
        self._kill()

    def uri(self, name: str = "store", bucket: str = BUCKET) -> str:
        """A store URI under a prefix no other call gets."""
        return (f"s3://{bucket}/{name}-{uuid.uuid4().hex[:8]}?endpoint_override=127.0.0.1:"
                f"{self.port}&scheme=http&region={REGION}")

    def client(self):
        import boto3

        return boto3.session.Session(
            aws_access_key_id=CLIENT_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CLIENT_ENV["AWS_SECRET_ACCESS_KEY"], region_name=REGION,
        ).client("s3", endpoint_url=f"http://127.0.0.1:{self.port}")

    def _start(self) -> bool:
        self._kill()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                    if s.recv(12).startswith(b"HTTP/"):
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def _log_tail(self) -> str:
        if self._log is None:
            return "no log"
        self._log.seek(0)
        return self._log.read()[-2000:].decode(errors="replace")


@pytest.fixture(scope="session")
def s3_service():
    """One S3 server for the session (tests take fresh prefixes from ``.uri()``)."""
    pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (pip install -e .[dev])")
    with S3Server() as server:
        yield server


@pytest.fixture
def s3(s3_service, monkeypatch):
    """The session's S3 server, with this test's process (and its children) pointed at it."""
    for key in CLIENT_UNSET:
        monkeypatch.delenv(key, raising=False)
    for key, value in CLIENT_ENV.items():
        monkeypatch.setenv(key, value)
    return s3_service


# -- the server process -------------------------------------------------------------------------------


def one_request_at_a_time(app):
    """WSGI middleware: requests reach ``app`` one at a time, read whole and answered after."""
    lock = threading.Lock()

    def serve(environ, start_response):
        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH")
        if environ.get("wsgi.input_terminated"):  # chunked: the server marks the end
            body = stream.read()
        else:
            body = stream.read(int(length)) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        chunks: list[bytes] = []
        reply = []

        def capture(status, headers, exc_info=None):
            reply[:] = [status, headers]
            return chunks.append

        with lock:
            result = app(environ, capture)
            try:
                chunks.extend(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
        start_response(*reply)
        return chunks

    return serve


def serve(port: int) -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = one_request_at_a_time(DomainDispatcherApplication(create_backend_app))
    run_simple("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


# -- worker processes for test_s3_store.py ------------------------------------------------------------


def create_worker(uri: str, keys: list[str], me: str, start, out) -> None:
    """Race to create every key; report the keys this process created."""
    from sisa_ray.core.store import Store

    store = Store(uri)
    start.wait()
    out.put((me, [k for k in keys if store.create_exclusive(k, me.encode())]))


def count_worker(uri: str, n: int, lease_s: float, me: str, start, out) -> None:
    """Increment ``counter`` ``n`` times under the writer lock; report each held interval."""
    from sisa_ray.core.store import Store

    store = Store(uri)
    start.wait()
    intervals, refused = [], 0
    for _ in range(n):
        with store.writer_lock(timeout=120, lease_s=lease_s) as lock:
            began = time.time()
            raw, tag = store.read_tagged("counter")
            time.sleep(0.01)  # a window for a second writer, were the lock not exclusive
            lock.check()
            refused += not store.replace_if("counter", str(int(raw or b"0") + 1).encode(), tag)
            intervals.append((began, time.time(), lock.token, me))
    out.put((me, intervals, refused))


def hold_worker(uri: str, lease_s: float, hold_s: float | None, acquired, go, out) -> None:
    """Take the lock, report its token, hold it ``hold_s`` seconds (or until ``go`` is set),
    then report whether ``check()`` still passes."""
    from sisa_ray.core.store import LeaseLost, Store

    with Store(uri).writer_lock(timeout=30, lease_s=lease_s) as lock:
        acquired.put((lock.token, lock.owner))
        if hold_s is None:
            go.wait()
        else:
            time.sleep(hold_s)
        try:
            lock.check()
            out.put(("held", lock.token))
        except LeaseLost as e:
            out.put(("lost", str(e)))


if __name__ == "__main__":
    serve(int(sys.argv[1]))
