"""`sisa-ray serve`: deletions and predictions over HTTP, acknowledged at once, applied in the
background, exact; bad requests answered with a 4xx and a one-line error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from test_exactness import assert_exact, fit

from sisa_ray.core.ledger import Ledger
from sisa_ray.core.plan import assign
from sisa_ray.core.store import LockTimeout, Store
from sisa_ray.ensemble import SISAEnsemble
from sisa_ray.serve import DeletionEndpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method: str, url: str, body=None, timeout: float = 60.0) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with OPENER.open(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def one_per_shard(train, config, shards) -> list[int]:
    shard, _ = assign(train.ids, config.sharding)
    return [int(train.ids[shard == s][0]) for s in shards]


@pytest.mark.ray
@pytest.mark.slow
def test_serve_deletes_over_http_exactly(tiny, tiny_config, tmp_path):
    train, test = tiny
    path = str(tmp_path / "s")
    fit(tiny_config, train, tmp_path, "s", test)
    victims = one_per_shard(train, tiny_config, (0, 2))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Its own fresh Ray instance ("local"), never the suite's or a `ray start` cluster's.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sisa_ray", "serve", "--store", path, "--port", str(port),
             "--backend", "local", "--address", "local", "--json"],
            stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO, start_new_session=True,
        )
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, f"serve exited early:\n{log_path.read_text()}"
            assert time.monotonic() - t0 < 120, f"serve not up in 120 s:\n{log_path.read_text()}"
            try:  # Serve's proxy answers 404 in plain text until the app is deployed
                status, st = call("GET", f"{url}/status", timeout=5)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            time.sleep(0.5)
        print(f"serve answered after {time.monotonic() - t0:.1f}s")
        assert st["generation"] == 1 and st["n_train_live"] == len(train)
        # the service holds the store's writer lock
        with pytest.raises(LockTimeout):
            with Store(path).writer_lock(timeout=0.1):
                pass

        features = test.features.reshape(len(test), -1).tolist()
        status, before = call("POST", f"{url}/predict", {"features": features})
        assert status == 200 and before["generation"] == 1 and len(before["predictions"]) == len(test)

        status, ack = call("POST", f"{url}/delete", {"ids": victims, "request_id": "gdpr-1"})
        assert status == 202
        assert ack == {"request_id": "gdpr-1", "status": "pending", "ids": sorted(victims)}
        # acknowledged means durably in the ledger
        assert "gdpr-1" in Ledger(Store(path)).state().requests

        deadline = time.monotonic() + 120
        while True:
            status, req = call("GET", f"{url}/requests/gdpr-1")
            assert status == 200
            if req["status"] != "pending" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert req["status"] == "completed", req
        assert sorted(req["report"]["deleted"]) == sorted(victims)
        assert sorted(s["shard"] for s in req["report"]["shards"]) == [0, 2]

        status, after = call("POST", f"{url}/predict", {"features": features, "vote": "soft"})
        assert status == 200 and after["generation"] == 2

        status, err = call("POST", f"{url}/delete", {"ids": [10**12]})
        assert status == 400 and "never trained on" in err["error"] and "\n" not in err["error"]
        status, err = call("GET", f"{url}/requests/no-such-request")
        assert status == 404 and "no-such-request" in err["error"]
        status, err = call("POST", f"{url}/delete", b"{not json")
        assert status == 400 and "not valid JSON" in err["error"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:  # everything this test started, and nothing else
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert proc.returncode == 0, log_path.read_text()
    # stdout holds the --json line alone: Ray's and Serve's output went to stderr
    assert len(out.splitlines()) == 1, out
    started = json.loads(out)
    assert started["url"] == url and started["store"] == path

    # the lock was released on the way out, and the result is exact
    ens = SISAEnsemble.open(path, backend="local")
    assert ens.pending_ == []
    assert_exact(ens, tiny_config, train, test, victims, tmp_path)
    np.testing.assert_array_equal(ens.predict(test.features, vote="soft"), after["predictions"])
    np.testing.assert_array_equal(ens.predict_proba(test.features, vote="soft"), after["proba"])


def test_routes_and_errors_without_ray(tiny, tiny_config, tmp_path):
    """The routing table and its error answers, on the endpoint class alone (no Ray, no HTTP)."""
    train, test = tiny
    path = str(tmp_path / "s")
    fit(tiny_config, train, tmp_path, "s", test)
    [victim] = one_per_shard(train, tiny_config, (1,))
    ep = DeletionEndpoint(path, backend="local")
    try:
        flat = test.features[:3].reshape(3, -1).tolist()
        status, pred = ep.handle("POST", "/predict", json.dumps({"features": flat}).encode())
        assert status == 200 and pred["generation"] == 1 and len(pred["proba"]) == 3

        status, ack = ep.handle("POST", "/delete", json.dumps({"ids": [victim]}).encode())
        assert status == 202 and ack["status"] == "pending"
        assert ep.service.wait(ack["request_id"])["status"] == "completed"
        status, again = ep.handle("POST", "/delete/", json.dumps({"ids": [victim]}).encode())
        assert status == 200 and again["status"] == "completed"  # same request: nothing redone
        status, st = ep.handle("GET", "/requests/" + ack["request_id"])
        assert status == 200 and st["report"]["deleted"] == [victim]
        status, st = ep.handle("GET", "/status")
        assert status == 200 and st["generation"] == 2 and st["ledger"]["completed"] == 1

        bad = [
            ("GET", "/nowhere", b"", 404, "no route GET /nowhere"),
            ("GET", "/predict", b"", 405, "/predict takes POST"),
            ("POST", "/status", b"", 405, "/status takes GET"),
            ("GET", "/requests/nope", b"", 404, "Unknown request id 'nope'"),
            ("POST", "/delete", b"", 400, "must be a JSON object"),
            ("POST", "/delete", b"[1, 2]", 400, "must be a JSON object"),
            ("POST", "/delete", b'{"ids": [1', 400, "not valid JSON"),
            ("POST", "/delete", b'{"id": [1]}', 400, "Unknown field(s) ['id']"),
            ("POST", "/delete", b'{"request_id": "x"}', 400, 'needs "ids"'),
            ("POST", "/delete", b'{"ids": ["3"]}', 400, "must be integers"),
            ("POST", "/delete", b'{"ids": []}', 400, "empty"),
            ("POST", "/delete", b'{"ids": [1000000000000]}', 400, "never trained on"),
            ("POST", "/delete", b'{"ids": [0], "request_id": ""}', 400, "non-empty string"),
            ("POST", "/predict", b'{"vote": "soft"}', 400, 'needs "features"'),
            ("POST", "/predict", b'{"features": [[1, 2]]}', 400, "(1, 8, 8)"),
            ("POST", "/predict", json.dumps({"features": flat, "vote": "mean"}).encode(), 400,
             "['hard', 'soft']"),
        ]
        for method, route, body, want, text in bad:
            status, err = ep.handle(method, route, body)
            assert (status, list(err)) == (want, ["error"]), (route, body, err)
            assert text in err["error"] and "\n" not in err["error"], (route, body, err)
        assert Ledger(Store(path)).summary()["requests"] == 1  # no bad request was recorded
    finally:
        ep.__del__()
    with Store(path).writer_lock(timeout=0):  # released by the shutdown path
        pass
