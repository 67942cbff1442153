"""The promises under adversarial use: threads and handles racing, a restored backup, another CPU,
a step left with one sample under batch norm, a class deleted entirely, a long-lived handle.

Each test reproduces a scenario that broke exactness or durability, and checks the outcome against
a fresh fit (bit for bit) or the ledger, not just that something ran.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import snapshot
from test_crash_safety import Crash, assert_ledger_consistent
from test_exactness import assert_exact, fit

from sisa_ray.core.checkpoint import states_identical
from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.core.ledger import Ledger
from sisa_ray.core.plan import assign
from sisa_ray.core.runtime import RuntimeMismatch, current_cpu_capability
from sisa_ray.core.store import LockTimeout, Store, StoreError
from sisa_ray.ensemble import SISAEnsemble
from sisa_ray.executor import LocalExecutor


def test_two_threads_with_their_own_handles_both_delete(tiny, tiny_config, tmp_path):
    """Each thread opens the store and deletes a different id: both deletions must be live,
    and the store must stay openable and exact (the lock used to let threads walk through)."""
    train, test = tiny
    path = str(tmp_path / "s")
    fit(tiny_config, train, tmp_path, "s", test)
    shard, _ = assign(train.ids, tiny_config.sharding)
    a, b = int(train.ids[shard == 0][0]), int(train.ids[shard == 0][1])  # same shard: a race
    errors = []
    barrier = threading.Barrier(2)

    def worker(victim):
        try:
            ens = SISAEnsemble.open(path, backend="local")
            barrier.wait()
            ens.unlearn([victim])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(v,)) for v in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ens = SISAEnsemble.open(path, backend="local")
    assert sorted(Ledger(ens.store_).deleted_ids()) == sorted([a, b])
    assert ens.manifest_.generation == 3
    assert_ledger_consistent(path)
    assert_exact(ens, tiny_config, train, test, [a, b], tmp_path)


def test_a_held_lock_excludes_another_handle_of_the_same_thread(tiny, tiny_config, tmp_path):
    train, _ = tiny
    ens = fit(tiny_config, train, tmp_path, "s")
    with ens.store_.writer_lock():
        other = Store(ens.store_.uri)
        with pytest.raises(LockTimeout, match="locked by another sisa-ray writer"):
            with other.writer_lock(timeout=0.1):
                pass
        # readers do not wait for the writer
        assert SISAEnsemble.open(ens.store_.uri, backend="local").status()["generation"] == 1


def _victims_of_one_shard(train, config, shard=1, n=1):
    s, _ = assign(train.ids, config.sharding)
    return [int(i) for i in train.ids[s == shard][:n]]


def test_restored_backup_brings_ids_back_and_is_caught(tiny, tiny_config, tmp_path):
    """Restore manifest and shards from a backup taken before a deletion, keep the ledger: the
    deleted id is live again. Readers refuse to serve it, verify names it, a writer deletes it
    again, and the result is exact."""
    train, test = tiny
    path = tmp_path / "s"
    ens = fit(tiny_config, train, tmp_path, "s", test)
    backup = tmp_path / "backup"
    backup.mkdir()
    for name in ("manifest.json", "manifests", "shards"):
        src = path / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, backup / name)
    victim = _victims_of_one_shard(train, tiny_config)
    ens.unlearn(victim, request_id="gdpr-1")
    for name in ("manifest.json", "manifests", "shards"):
        if (path / name).is_dir():
            shutil.rmtree(path / name)
        (shutil.copytree if (backup / name).is_dir() else shutil.copy2)(backup / name, path / name)

    reader = SISAEnsemble.open(str(path), backend="local", recover=False)
    assert reader.resurrected_ == victim
    assert reader.status()["resurrected_ids"] == victim
    with pytest.raises(StoreError, match=rf"ids \[{victim[0]}\] were deleted.*sisa-ray recover"):
        reader.predict(test.features[:2])
    rep = reader.verify()
    assert not rep.identical and rep.resurrected_ids == victim

    # re-sending the request is a duplicate, but the writer first deletes the id again
    again = SISAEnsemble.open(str(path), backend="local", recover=False)
    dup = again.unlearn(victim, request_id="gdpr-1")
    assert dup.duplicate_request
    assert again.resurrected_ == []
    assert_ledger_consistent(str(path))
    assert_exact(again, tiny_config, train, test, victim, tmp_path)
    assert SISAEnsemble.open(str(path), backend="local").verify().identical


def test_open_reapplies_a_restored_deletion(tiny, tiny_config, tmp_path):
    train, test = tiny
    path = tmp_path / "s"
    ens = fit(tiny_config, train, tmp_path, "s", test)
    saved = {n: (path / n).read_bytes() for n in ("manifest.json",)}
    keep = tmp_path / "keep"
    shutil.copytree(path / "manifests", keep / "manifests")
    shutil.copytree(path / "shards", keep / "shards")
    victim = _victims_of_one_shard(train, tiny_config, shard=3)
    ens.unlearn(victim)
    shutil.rmtree(path / "shards")
    shutil.copytree(keep / "shards", path / "shards")
    shutil.copytree(keep / "manifests", path / "manifests", dirs_exist_ok=True)
    (path / "manifest.json").write_bytes(saved["manifest.json"])
    reopened = SISAEnsemble.open(str(path), backend="local")  # a writer is free: re-applies
    assert reopened.resurrected_ == []
    reqs = Ledger(reopened.store_).requests()
    assert [r for r in reqs if r.startswith("reapply-")], reqs
    assert_exact(reopened, tiny_config, train, test, victim, tmp_path)


def _run_python(code: str, env_extra: dict, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


TRAIN_DEFAULT_CAPABILITY = """
import numpy as np, sys
from sisa_ray.datasets import load_digits
from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.ensemble import SISAEnsemble
train, test = load_digits()
cfg = SISAConfig(sharding=ShardingConfig(n_shards=2, n_slices=2, seed=5),
                 training=TrainingConfig(model="mlp", epochs=2, batch_size=16, hidden=16))
ens = SISAEnsemble(cfg, store=sys.argv[1], backend="local")
ens.fit(train.take(np.arange(200)), test.take(np.arange(50)))
print(ens.config_.training.cpu_capability)
"""


@pytest.mark.skipif(current_cpu_capability() == "default",
                    reason="this CPU has no capability above 'default' to mix with")
def test_store_trained_on_another_cpu_capability_is_refused_in_process(tmp_path):
    """Trained where PyTorch used its portable kernels; this process uses vector kernels, which
    round differently: an in-process deletion must refuse before anything changes."""
    path = tmp_path / "s"
    out = _run_python(TRAIN_DEFAULT_CAPABILITY, {"ATEN_CPU_CAPABILITY": "default"}, path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "default"
    ens = SISAEnsemble.open(str(path), backend="local")
    before = snapshot(path)
    with pytest.raises(RuntimeMismatch, match="ATEN_CPU_CAPABILITY=default"):
        ens.unlearn([int(ens.retained_data().ids[0])])
    assert snapshot(path) == before
    assert Ledger(ens.store_).requests() == {}


@pytest.mark.ray
@pytest.mark.skipif(current_cpu_capability() == "default",
                    reason="this CPU has no capability above 'default' to mix with")
def test_ray_workers_are_pinned_to_the_store_capability(tmp_path, ray_session):
    """Trained with 'default' kernels in one process; deleted from this (avx2/avx512) driver on
    Ray: the workers start with ATEN_CPU_CAPABILITY=default, so the retrain is bit-for-bit the
    fresh fit made in another 'default' process."""
    path = tmp_path / "s"
    out = _run_python(TRAIN_DEFAULT_CAPABILITY, {"ATEN_CPU_CAPABILITY": "default"}, path)
    assert out.returncode == 0, out.stderr
    ens = SISAEnsemble.open(str(path), backend="ray")
    victim = int(ens.retained_data().ids[3])
    ens.unlearn([victim])
    ens.close()
    # the oracle: a fresh fit without the victim, in a process pinned to 'default'
    fresh = tmp_path / "fresh"
    code = TRAIN_DEFAULT_CAPABILITY.replace(
        "ens.fit(train.take(np.arange(200)), test.take(np.arange(50)))",
        f"d = train.take(np.arange(200)); ens.fit(d.without_ids(np.array([{victim}])))")
    out = _run_python(code, {"ATEN_CPU_CAPABILITY": "default"}, fresh)
    assert out.returncode == 0, out.stderr
    mine = SISAEnsemble.open(str(path), backend="local", recover=False)
    theirs = SISAEnsemble.open(str(fresh), backend="local", recover=False)
    for a, b in zip(mine.shard_states(all_steps=True), theirs.shard_states(all_steps=True)):
        for x, y in zip(a, b):
            assert states_identical(x, y) == []
    # and this process's own kernels would have given other bits: the pinning mattered
    local = SISAEnsemble(mine.config_.__class__(
        sharding=mine.config_.sharding,
        training=TrainingConfig(**{**mine.config_.training.__dict__, "cpu_capability": None}),
    ), store=str(tmp_path / "native"), backend="local").fit(mine.retained_data())
    assert any(states_identical(x, y) for x, y in zip(local.shard_states(), mine.shard_states()))


def test_a_step_left_with_one_sample_under_batch_norm_trains(digits, tmp_path):
    """resnet18 (batch norm): delete all but one sample of a slice, so a step trains on one
    sample. The deletion completes, and a fresh fit on the same data gives the same bits."""
    train, test = digits
    data = train.take(np.arange(60))
    cfg = SISAConfig(sharding=ShardingConfig(n_shards=2, n_slices=2, seed=3),
                     training=TrainingConfig(model="resnet18", epochs=1, batch_size=8))
    shard, slice_ = assign(data.ids, cfg.sharding)
    first = data.ids[(shard == 0) & (slice_ == 0)]
    victims = first[1:].tolist()  # slice 0 of shard 0 keeps one sample: step 0 has one sample
    ens = fit(cfg, data, tmp_path, "s", test.take(np.arange(20)))
    rep = ens.unlearn(victims)
    assert [r.shard for r in rep.shards] == [0]
    assert ens.manifest_.shards[0].slice_counts[0] == 1
    assert_exact(ens, cfg, data, test.take(np.arange(20)), victims, tmp_path)


def test_reads_work_while_a_request_is_pending_and_abandon_is_the_way_out(tiny, tiny_config,
                                                                          tmp_path):
    train, test = tiny
    path = str(tmp_path / "s")
    fit(tiny_config, train, tmp_path, "s", test)

    class RetrainAlwaysFails(LocalExecutor):
        def run_jobs(self, jobs, progress=None):
            raise Crash("this retrain cannot run")

    victim = _victims_of_one_shard(train, tiny_config)
    with pytest.raises(Crash):
        SISAEnsemble.open(path, executor=RetrainAlwaysFails()).unlearn(victim, request_id="r")
    # every later writer tries again and fails the same way, but readers keep working
    with pytest.raises(Crash):
        SISAEnsemble.open(path, executor=RetrainAlwaysFails())
    reader = SISAEnsemble.open(path, backend="local", recover=False)
    assert reader.status()["pending_requests"] == ["r"]
    before = reader.predict(test.features)
    with pytest.raises(ValueError, match="only pending requests can be abandoned"):
        reader.abandon("nope", "typo")
    reader.abandon("r", "retrain fails on this cluster; ticket 42")
    st = SISAEnsemble.open(path, backend="local").status()
    assert st["pending_requests"] == [] and st["ledger"]["abandoned"] == 1
    assert st["ledger"]["deleted_ids"] == 0
    np.testing.assert_array_equal(SISAEnsemble.open(path, backend="local").predict(test.features),
                                  before)
    # the ids can be sent again as a new request, and then they are deleted
    ens = SISAEnsemble.open(path, backend="local")
    ens.unlearn(victim, request_id="r2")
    assert_exact(ens, tiny_config, train, test, victim, tmp_path)


def test_deleting_a_whole_class_keeps_the_model_shape(tiny, tiny_config, tmp_path):
    """n_classes is part of the config: after every sample of the top class is deleted, the
    models still have its output, verify compares against the same shape, and a user's retrain
    with the recorded n_classes is bit-identical."""
    train, test = tiny
    top = int(train.labels.max())
    victims = train.ids[train.labels == top].tolist()
    ens = fit(tiny_config, train, tmp_path, "s", test)
    assert ens.config_.training.n_classes == 10
    ens.unlearn(victims)
    assert ens.verify().identical
    reduced = train.without_ids(np.asarray(victims))
    inferred = type(reduced)(ids=reduced.ids, features=reduced.features, labels=reduced.labels,
                             n_classes=top, name="user-retrain")  # what inference would give
    with_n = SISAConfig(sharding=tiny_config.sharding,
                        training=TrainingConfig(**{**tiny_config.training.__dict__,
                                                   "n_classes": 10}))
    user = SISAEnsemble(with_n, store=str(tmp_path / "u"), backend="local").fit(inferred)
    assert user.config_.config_hash() == ens.config_.config_hash()
    for a, b in zip(user.shard_states(all_steps=True), ens.shard_states(all_steps=True)):
        assert all(states_identical(x, y) == [] for x, y in zip(a, b))


def test_long_lived_handle_serves_the_new_generation(tiny, tiny_config, tmp_path):
    train, test = tiny
    path = str(tmp_path / "s")
    fit(tiny_config, train, tmp_path, "s", test)
    service = SISAEnsemble.open(path, backend="local")
    service.predict(test.features)  # models loaded
    shard, _ = assign(train.ids, tiny_config.sharding)
    victims = train.ids[shard == 2].tolist()  # shard 2 ends up empty: it must stop voting
    writer = SISAEnsemble.open(path, backend="local")
    writer.unlearn(victims)
    probs, active = service.shard_proba(test.features)
    assert service.manifest_.generation == 2
    assert not active[2]
    p2, a2 = writer.shard_proba(test.features)
    np.testing.assert_array_equal(probs, p2)
    np.testing.assert_array_equal(active, a2)


def test_failed_first_fit_leaves_the_store_reusable(digits, tmp_path):
    train, _ = digits
    data = train.take(np.arange(100)).__class__(
        ids=np.arange(100), features=np.random.default_rng(0).random((100, 7)),
        labels=np.arange(100) % 3, n_classes=3, name="flat")
    path = str(tmp_path / "s")
    bad = SISAConfig(sharding=ShardingConfig(n_shards=2, n_slices=2),
                     training=TrainingConfig(model="cnn", epochs=1))
    with pytest.raises(ValueError, match="--model mlp"):
        SISAEnsemble(bad, store=path, backend="local").fit(data)
    good = SISAConfig(sharding=ShardingConfig(n_shards=2, n_slices=2),
                      training=TrainingConfig(model="mlp", epochs=1))
    ens = SISAEnsemble(good, store=path, backend="local").fit(data)
    assert ens.status()["config_hash"] == ens.config_.config_hash()


def test_test_split_of_another_width_is_refused_before_training(tiny, tiny_config, tmp_path):
    train, test = tiny
    narrow = test.__class__(ids=test.ids, features=test.features.reshape(len(test), -1)[:, :60],
                            labels=test.labels, n_classes=10, name="narrow")
    path = tmp_path / "s"
    with pytest.raises(ValueError, match=r"the test set have shape \(60,\)"):
        SISAEnsemble(tiny_config, store=str(path), backend="local").fit(train, narrow)
    assert not path.exists() or snapshot(path) == {}


def test_leftover_temporaries_are_collected(tiny, tiny_config, tmp_path):
    train, _ = tiny
    ens = fit(tiny_config, train, tmp_path, "s")
    root = tmp_path / "s"
    (root / ".tmp").mkdir(exist_ok=True)
    crashed = [root / ".tmp" / "manifest.json.tmp-deadbeef",
               root / ".tmp" / "0000000001.json.tmp-cafe0001"]
    in_flight = root / ".tmp" / "step_001.pt.tmp-0123abcd"  # a write happening right now
    for p in [*crashed, in_flight]:
        p.write_text("{")
    for p in crashed:
        os.utime(p, (1e9, 1e9))  # left by a crash long ago
    ens.unlearn([int(train.ids[0])])
    left = [p.name for p in root.rglob("*") if ".tmp-" in p.name]
    assert left == [in_flight.name]


def test_formats_are_checked(tiny, tiny_config, tmp_path):
    train, _ = tiny
    fit(tiny_config, train, tmp_path, "s")
    meta_path = tmp_path / "s" / "store.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(StoreError, match="format 99; this sisa-ray reads format 2"):
        SISAEnsemble.open(str(tmp_path / "s"), backend="local")
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "config"}))
    with pytest.raises(StoreError, match=r"lacks \['config'\]"):
        SISAEnsemble.open(str(tmp_path / "s"), backend="local")
    meta_path.write_text(json.dumps(meta))
    ptr = tmp_path / "s" / "manifest.json"
    ptr.write_text(json.dumps({**json.loads(ptr.read_text()), "format": 1}))
    with pytest.raises(StoreError, match="manifest.json has format 1"):
        SISAEnsemble.open(str(tmp_path / "s"), backend="local")


def test_ids_beyond_int64_are_refused(tiny, tiny_config, tmp_path):
    train, _ = tiny
    ens = fit(tiny_config, train, tmp_path, "s")
    for bad in (2**63, np.uint64(2**63 + 5), 99999999999999999999):
        with pytest.raises(ValueError, match="must fit in int64"):
            ens.unlearn([bad])
    assert Ledger(ens.store_).requests() == {}
