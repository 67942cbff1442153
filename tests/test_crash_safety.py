"""Crash safety: a failure at any point of a deletion, then reopening the store, ends exact."""

from __future__ import annotations

import numpy as np
import pytest
from test_exactness import assert_exact

from sisa_ray.core.ledger import Ledger
from sisa_ray.core.manifest import read_manifest
from sisa_ray.core.store import Store
from sisa_ray.ensemble import SISAEnsemble
from sisa_ray.executor import LocalExecutor
from sisa_ray.shard import ShardWorker


class Crash(RuntimeError):
    pass


def assert_ledger_consistent(store_path: str) -> None:
    """Every id the ledger calls deleted is gone from the live manifest's shard data."""
    store = Store(store_path)
    manifest = read_manifest(store)
    live = set()
    for e in manifest.shards:
        live.update(store.read_table(e.data.path).column("id").to_pylist())
    ledger = Ledger(store)
    for req in ledger.requests().values():
        if req.status == "completed":
            ids = set(ledger.request_ids(req.request_id))
            assert not live & ids, f"{req.request_id} completed but ids still live"
            assert ids <= ledger.deleted_ids()


def three_shard_victims(train, config):
    from sisa_ray.core.plan import assign

    shard, _ = assign(train.ids, config.sharding)
    return [int(train.ids[shard == s][0]) for s in (0, 1, 2)]


def reopen_and_check(path, config, train, test, victims, tmp_path):
    ens = SISAEnsemble.open(path, backend="local")
    led = Ledger(ens.store_).requests()
    assert [r.status for r in led.values()] == ["completed"]
    assert sorted(Ledger(ens.store_).deleted_ids()) == sorted(victims)
    assert_ledger_consistent(path)
    assert_exact(ens, config, train, test, victims, tmp_path)
    # no leftovers of old or half-written versions
    refs = ens.manifest_.referenced()
    assert set(ens.store_.list("shards") + ens.store_.list("test")) == refs
    return ens


def test_crash_after_ledger_append(tiny, tiny_config, tmp_path):
    train, test = tiny
    path = str(tmp_path / "s")
    SISAEnsemble(tiny_config, store=path, backend="local").fit(train, test)

    class DiesBeforeRetraining(LocalExecutor):
        def run_jobs(self, jobs, progress=None):
            raise Crash("killed right after the ledger append")

    victims = three_shard_victims(train, tiny_config)
    ens = SISAEnsemble.open(path, executor=DiesBeforeRetraining())
    with pytest.raises(Crash):
        ens.unlearn(victims)
    assert [r.status for r in Ledger(Store(path)).requests().values()] == ["pending"]
    assert read_manifest(Store(path)).generation == 1
    assert_ledger_consistent(path)
    reopen_and_check(path, tiny_config, train, test, victims, tmp_path)


def test_crash_in_the_middle_of_retraining(tiny, tiny_config, tmp_path):
    train, test = tiny
    path = str(tmp_path / "s")
    SISAEnsemble(tiny_config, store=path, backend="local").fit(train, test)

    class DiesOnSecondShard(ShardWorker):
        calls = 0

        def train(self, job):
            type(self).calls += 1
            if type(self).calls == 2:
                raise Crash("shard process killed while retraining")
            return super().train(job)

    victims = three_shard_victims(train, tiny_config)
    ens = SISAEnsemble.open(path, executor=LocalExecutor(worker_cls=DiesOnSecondShard))
    with pytest.raises(Crash):
        ens.unlearn(victims)
    assert DiesOnSecondShard.calls == 2
    assert read_manifest(Store(path)).generation == 1  # old state still live
    assert_ledger_consistent(path)
    reopen_and_check(path, tiny_config, train, test, victims, tmp_path)


def test_crash_in_the_middle_of_writing_checkpoints(tiny, tiny_config, tmp_path, monkeypatch):
    train, test = tiny
    path = str(tmp_path / "s")
    SISAEnsemble(tiny_config, store=path, backend="local").fit(train, test)
    victims = three_shard_victims(train, tiny_config)

    real_write = Store.write_bytes
    state = {"ckpts": 0}

    def torn_write(self, rel, data):
        if rel.endswith(".pt"):
            state["ckpts"] += 1
            if state["ckpts"] == 4:
                # a torn write: half the bytes land in a temporary beside the target
                with open(f"{self.root}/{rel}.tmp-torn", "wb") as f:
                    f.write(data[: len(data) // 2])
                raise Crash("power lost while writing a checkpoint")
        return real_write(self, rel, data)

    monkeypatch.setattr(Store, "write_bytes", torn_write)
    ens = SISAEnsemble.open(path, backend="local")
    with pytest.raises(Crash):
        ens.unlearn(victims)
    monkeypatch.setattr(Store, "write_bytes", real_write)
    assert read_manifest(Store(path)).generation == 1
    assert_ledger_consistent(path)
    reopen_and_check(path, tiny_config, train, test, victims, tmp_path)


def test_crash_between_manifest_swap_and_ledger_completion(tiny, tiny_config, tmp_path,
                                                           monkeypatch):
    train, test = tiny
    path = str(tmp_path / "s")
    SISAEnsemble(tiny_config, store=path, backend="local").fit(train, test)
    victims = three_shard_victims(train, tiny_config)

    def dies(self, request_id, report, lock):
        raise Crash("killed after the manifest swap")

    monkeypatch.setattr(Ledger, "complete", dies)
    ens = SISAEnsemble.open(path, backend="local")
    with pytest.raises(Crash):
        ens.unlearn(victims)
    monkeypatch.undo()
    assert read_manifest(Store(path)).generation == 2  # the deletion is live already
    assert_ledger_consistent(path)
    ens = reopen_and_check(path, tiny_config, train, test, victims, tmp_path)
    assert ens.manifest_.generation == 2  # finishing it did not retrain again


def test_interrupted_fit_resumes(tiny, tiny_config, tmp_path):
    train, test = tiny
    path = str(tmp_path / "s")

    class DiesOnThirdShard(ShardWorker):
        calls = 0

        def train(self, job):
            type(self).calls += 1
            if type(self).calls == 3:
                raise Crash("killed during training")
            return super().train(job)

    with pytest.raises(Crash):
        SISAEnsemble(tiny_config, store=path,
                     executor=LocalExecutor(worker_cls=DiesOnThirdShard)).fit(train, test)
    from sisa_ray.core.store import StoreError

    with pytest.raises(StoreError, match="did not finish.*again to resume"):
        SISAEnsemble.open(path, backend="local")
    ens = SISAEnsemble(tiny_config, store=path, backend="local").fit(train, test)
    fresh = SISAEnsemble(tiny_config, store=str(tmp_path / "f"), backend="local").fit(train)
    from sisa_ray.core.checkpoint import states_identical

    for a, b in zip(ens.shard_states(), fresh.shard_states()):
        assert states_identical(a, b) == []
    assert np.array_equal(ens.predict(test.features), fresh.predict(test.features))
