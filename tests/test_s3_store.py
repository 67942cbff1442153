"""Object stores against a real S3 server on 127.0.0.1 (moto, see s3_server.py): conditional
writes, the writer lease across threads and processes, and the whole store on S3."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time

import pytest
import s3_server
from s3_server import count_worker, create_worker, hold_worker

from sisa_ray.core.lease import ObjectLease
from sisa_ray.core.store import LOCK_FILE, LeaseLost, LockTimeout, Store, StoreError

s3_service, s3 = s3_server.s3_service, s3_server.s3  # the server fixtures, used here
SPAWN = multiprocessing.get_context("spawn")  # no fork of a process with client threads


def start(target, *args):
    p = SPAWN.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def lease_doc(store: Store) -> dict:
    return json.loads(store.read_bytes(LOCK_FILE))


# -- conditional writes ------------------------------------------------------------------------------


def test_create_exclusive_threads_one_winner_per_key(s3):
    store = Store(s3.uri())
    keys = [f"race/{i}" for i in range(40)]
    wins: dict[str, list[int]] = {k: [] for k in keys}
    barrier = threading.Barrier(6)

    def racer(me: int) -> None:
        for k in keys:
            barrier.wait()
            if store.create_exclusive(k, str(me).encode()):
                wins[k].append(me)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(w) == 1 for w in wins.values()), {k: w for k, w in wins.items() if len(w) != 1}
    for k, (winner,) in wins.items():
        assert store.read_bytes(k) == str(winner).encode()  # nobody overwrote the winner


def test_create_exclusive_processes_one_winner_per_key(s3):
    uri = s3.uri()
    keys = [f"ledger/{i:010d}.json" for i in range(150)]
    go, out = SPAWN.Event(), SPAWN.Queue()
    procs = [start(create_worker, uri, keys, me, go, out) for me in ("a", "b")]
    go.set()
    created = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert not set(created["a"]) & set(created["b"])
    assert sorted(created["a"] + created["b"]) == keys
    store = Store(uri)
    for me, mine in created.items():
        assert all(store.read_bytes(k) == me.encode() for k in mine)


def test_replace_if_stale_tag_loses(s3):
    store = Store(s3.uri())
    assert store.read_tagged("m.json") == (None, None)
    assert not store.replace_if("m.json", b"x", '"0123456789abcdef0123456789abcdef"')
    assert not store.exists("m.json")  # If-Match on an absent object creates nothing
    assert store.replace_if("m.json", b"v1", None)
    assert not store.replace_if("m.json", b"again", None)  # None: only if absent
    data, tag1 = store.read_tagged("m.json")
    assert data == b"v1"
    assert store.replace_if("m.json", b"v2", tag1)
    data, tag2 = store.read_tagged("m.json")
    assert data == b"v2" and tag2 != tag1
    assert not store.replace_if("m.json", b"stale", tag1)
    assert store.read_bytes("m.json") == b"v2"


def test_missing_bucket_is_one_clear_line(s3):
    store = Store(s3.uri(bucket="no-such-bucket"))
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist. Create it") as e:
        store.create_exclusive("x", b"")
    assert "\n" not in str(e.value)


def test_missing_client_packages_say_what_to_install(s3, monkeypatch):
    for name in ("boto3", "google.api_core", "google.cloud.storage"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(StoreError, match=r"pip install 'sisa-ray\[s3\]'"):
        Store(s3.uri()).create_exclusive("x", b"")
    with pytest.raises(StoreError, match="pip install google-cloud-storage"):
        Store("gs://some-bucket/store").read_tagged(LOCK_FILE)


# -- the lease ---------------------------------------------------------------------------------------


def test_token_grows_and_lease_object_stays(s3):
    store = Store(s3.uri())
    tokens = []
    for _ in range(3):
        with store.writer_lock(timeout=5, lease_s=5) as lock:
            assert isinstance(lock, ObjectLease)
            doc = lease_doc(store)
            assert (doc["owner"], doc["token"], doc["released"]) == (lock.owner, lock.token, False)
            lock.check()
            tokens.append(lock.token)
        doc = lease_doc(store)
        assert doc["released"] and doc["token"] == tokens[-1]
    assert tokens == [1, 2, 3]
    assert store.is_empty()  # .lock does not count


def test_acquire_adopts_its_own_write_whose_reply_was_lost(s3, monkeypatch):
    store = Store(s3.uri())
    remote = store._remote()
    real_put_if, lost = remote.put_if, []

    def reply_lost(rel, data, tag):  # the write lands, a retry of it then gets 412
        new_tag = real_put_if(rel, data, tag)
        if not lost:
            lost.append(new_tag)
            return None
        return new_tag

    monkeypatch.setattr(remote, "put_if", reply_lost)
    with store.writer_lock(timeout=1, lease_s=5) as lock:
        assert lost and lock.token == 1
        assert lease_doc(store)["owner"] == lock.owner
        lock.check()
    assert lease_doc(store)["released"]  # the adopted version's tag was right


def test_unreachable_endpoint_is_one_clear_line(s3):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    store = Store(f"s3://{s3_server.BUCKET}/x?endpoint_override=127.0.0.1:{port}&scheme=http"
                  "&region=us-east-1")
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}.*failed") as e:
        store.create_exclusive("x", b"")
    assert "\n" not in str(e.value)


def test_lock_is_not_reentrant(s3):
    lock = Store(s3.uri()).writer_lock(timeout=1, lease_s=5)
    with lock:
        with pytest.raises(RuntimeError, match="not re-entrant"):
            lock.__enter__()
        lock.check()
    with pytest.raises(LeaseLost, match="does not hold"):
        lock.check()


def test_other_handles_and_threads_are_excluded(s3):
    uri = s3.uri()
    shared = Store(uri)
    intervals, refused = [], []

    def worker(store: Store) -> None:
        for _ in range(5):
            with store.writer_lock(timeout=60, lease_s=5) as lock:
                began = time.time()
                raw, tag = store.read_tagged("counter")
                time.sleep(0.01)
                if not store.replace_if("counter", str(int(raw or b"0") + 1).encode(), tag):
                    refused.append(lock.token)
                intervals.append((began, time.time(), lock.token))

    stores = [shared, shared, Store(uri), Store(uri)]  # two threads per handle, two handles
    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert refused == []
    assert int(shared.read_bytes("counter")) == 20
    assert_disjoint(intervals)


def assert_disjoint(intervals) -> None:
    intervals = sorted(intervals)
    for (_, end, token), (began, _, next_token) in zip(intervals, intervals[1:]):
        assert end <= began, f"token {token} still held when token {next_token} began"
        assert next_token > token
    assert [t for _, _, t in intervals] == list(range(1, len(intervals) + 1))


def test_two_processes_count_without_lost_updates(s3):
    uri, n = s3.uri(), 15
    go, out = SPAWN.Event(), SPAWN.Queue()
    procs = [start(count_worker, uri, n, 5.0, me, go, out) for me in ("a", "b")]
    go.set()
    results = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    assert [r[2] for r in results] == [0, 0]  # no conditional write of the counter was refused
    assert int(Store(uri).read_bytes("counter")) == 2 * n
    intervals = [i[:3] for r in results for i in r[1]]
    assert len(intervals) == 2 * n
    assert_disjoint(intervals)


def test_lease_shorter_than_the_job_is_renewed(s3):
    uri = s3.uri()
    store = Store(uri)
    acquired, go, out = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    holder = start(hold_worker, uri, 2.0, 6.0, acquired, go, out)
    token, owner = acquired.get(timeout=60)
    began = time.monotonic()
    timeouts = 0
    while time.monotonic() - began < 4.5:  # well past the 2 s a lease lasts unrenewed
        with pytest.raises(LockTimeout, match=f"{owner}.*lease ends at") as e:
            with store.writer_lock(timeout=1, lease_s=2):
                pass
        assert "\n" not in str(e.value)
        timeouts += 1
    assert timeouts >= 3
    assert out.get(timeout=30) == ("held", token)  # the holder's check() passed after 6 s
    holder.join(30)
    assert holder.exitcode == 0
    assert lease_doc(store)["released"]
    with store.writer_lock(timeout=1, lease_s=2) as lock:
        assert lock.token == token + 1


def test_paused_holder_loses_the_lease_and_spares_the_new_owner(s3):
    uri = s3.uri()
    store = Store(uri)
    acquired, go, out = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    holder = start(hold_worker, uri, 2.0, None, acquired, go, out)
    token, owner = acquired.get(timeout=60)
    os.kill(holder.pid, signal.SIGSTOP)  # a GC pause, a partition: no renewals
    try:
        paused = time.monotonic()
        with store.writer_lock(timeout=10, lease_s=5) as lock:
            waited = time.monotonic() - paused
            assert lock.token == token + 1
            assert waited > 2.0 * (2 / 3) - 0.2  # not before the paused lease could expire
            os.kill(holder.pid, signal.SIGCONT)
            go.set()
            state, message = out.get(timeout=30)
            holder.join(30)
            assert (state, holder.exitcode) == ("lost", 0)
            assert f"token {token}" in message
            doc = lease_doc(store)  # the old holder's release left the new lease alone
            assert (doc["owner"], doc["token"], doc["released"]) == (lock.owner, token + 1, False)
            assert doc["owner"] != owner
            lock.check()
        assert lease_doc(store)["released"]
    finally:
        if holder.is_alive():
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()


def test_renewal_notices_a_takeover_and_release_spares_it(s3):
    store = Store(s3.uri())
    lock = store.writer_lock(timeout=1, lease_s=6)
    with lock:
        _, tag = store.read_tagged(LOCK_FILE)
        usurper = {"owner": "someone-else", "token": lock.token + 1, "expires": time.time() + 60,
                   "released": False}
        assert store.replace_if(LOCK_FILE, json.dumps(usurper).encode(), tag)
        lock.check()  # this holder cannot know yet
        deadline = time.monotonic() + 4  # the next renewal (every 2 s) meets the new version
        while lock._lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseLost, match="taken over"):  # not merely expired: 4.5 s are not up
            lock.check()
    assert lease_doc(store) == usurper  # released only its own lease: none


def test_holder_stops_when_renewals_stop(s3):
    store = Store(s3.uri())
    lock = store.writer_lock(timeout=1, lease_s=4)
    with lock:
        lock._stop.set()  # the renewal thread ends, as if the store were unreachable
        lock._renewer.join()
        lock.check()
        time.sleep(4 * 0.75 + 0.1)
        with pytest.raises(LeaseLost, match="not renewed"):
            lock.check()
        assert time.time() < lease_doc(store)["expires"]  # it stopped before the lease ended
    assert lease_doc(store)["released"]  # nobody took over, so its release went through


# -- the whole store on S3 ---------------------------------------------------------------------------


@pytest.mark.slow
def test_train_unlearn_reopen_verify_on_s3(s3, tiny, tiny_config, tmp_path):
    from test_exactness import assert_exact

    from sisa_ray.core.ledger import Ledger
    from sisa_ray.ensemble import SISAEnsemble

    train, test = tiny
    uri = s3.uri("ensemble")
    SISAEnsemble(tiny_config, store=uri, backend="local").fit(train, test)
    victims = train.ids[[3, 77, 150]].tolist()
    SISAEnsemble.open(uri, backend="local").unlearn(victims)
    ens = SISAEnsemble.open(uri, backend="local")
    assert sorted(Ledger(ens.store_).deleted_ids()) == sorted(victims)
    assert ens.verify().identical
    assert_exact(ens, tiny_config, train, test, victims, tmp_path)
    assert lease_doc(ens.store_)["released"]


def test_crash_after_ledger_append_recovers_on_s3(s3, tiny, tiny_config, tmp_path):
    from test_crash_safety import Crash, reopen_and_check, three_shard_victims

    from sisa_ray.core.ledger import Ledger
    from sisa_ray.core.manifest import read_manifest
    from sisa_ray.ensemble import SISAEnsemble
    from sisa_ray.executor import LocalExecutor

    class DiesBeforeRetraining(LocalExecutor):
        def run_jobs(self, jobs, progress=None):
            raise Crash("killed right after the ledger append")

    train, test = tiny
    uri = s3.uri("crash")
    SISAEnsemble(tiny_config, store=uri, backend="local").fit(train, test)
    victims = three_shard_victims(train, tiny_config)
    with pytest.raises(Crash):
        SISAEnsemble.open(uri, executor=DiesBeforeRetraining()).unlearn(victims)
    assert [r.status for r in Ledger(Store(uri)).requests().values()] == ["pending"]
    assert read_manifest(Store(uri)).generation == 1
    ens = reopen_and_check(uri, tiny_config, train, test, victims, tmp_path)
    assert ens.verify().identical
