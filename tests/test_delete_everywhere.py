"""A deletion reaches every copy the store holds: training shards and the stored test split."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import snapshot
from test_exactness import assert_exact

from sisa_ray import deletion
from sisa_ray.cli import main
from sisa_ray.core.ledger import Ledger
from sisa_ray.core.manifest import read_manifest, write_manifest
from sisa_ray.core.store import Store
from sisa_ray.deletion import LEGACY_TEST_DATA
from sisa_ray.ensemble import SISAEnsemble


class Crash(RuntimeError):
    pass


def fit(config, train, test, path):
    return SISAEnsemble(config, store=str(path), backend="local").fit(train, test)


def test_id_only_in_test_split_is_removed_without_retraining(tiny, tiny_config, tmp_path):
    train, test = tiny
    victim = int(test.ids[7])
    assert victim not in set(train.ids.tolist())
    ens = fit(tiny_config, train, test, tmp_path / "s")
    before = ens.manifest_.copy()
    old_test = before.test.path

    rep = ens.unlearn([victim])

    assert rep.deleted == [victim] and rep.already_deleted == []
    assert rep.in_test_split == [victim] and rep.in_shards == []
    assert rep.shards == [] and rep.retrained_sample_steps == 0
    after = ens.manifest_
    assert after.generation == before.generation + 1
    assert [e.to_dict() for e in after.shards] == [e.to_dict() for e in before.shards]
    kept = ens.test_data()
    expected = test.without_ids(np.asarray([victim]))
    np.testing.assert_array_equal(kept.ids, expected.ids)
    np.testing.assert_array_equal(kept.features, expected.features)
    np.testing.assert_array_equal(kept.labels, expected.labels)
    # the old split, which holds the row, is gone; only the live one is left
    assert ens.store_.list("test") == [after.test.path] and after.test.path != old_test
    assert victim in Ledger(ens.store_).deleted_ids()
    assert ens.status()["n_test_live"] == len(test) - 1

    again = ens.unlearn([victim], request_id="again")
    assert again.deleted == [] and again.already_deleted == [victim]
    assert again.in_test_split == []


def test_mixed_request_reports_both_places_and_stays_exact(tiny, tiny_config, tmp_path):
    train, test = tiny
    in_train, in_test = int(train.ids[3]), int(test.ids[0])
    ens = fit(tiny_config, train, test, tmp_path / "s")
    rep = ens.unlearn([in_test, in_train])
    assert rep.deleted == sorted([in_train, in_test])
    assert rep.in_shards == [in_train] and rep.in_test_split == [in_test]
    assert len(rep.shards) == 1 and rep.shards[0].deleted == 1
    assert in_test not in set(ens.test_data().ids.tolist())
    assert_exact(ens, tiny_config, train, test, [in_train], tmp_path)
    ver = ens.verify()
    assert ver.identical and ver.predictions_identical and ver.resurrected_ids == []


def test_unknown_id_beside_a_test_id_changes_nothing(tiny, tiny_config, tmp_path):
    train, test = tiny
    ens = fit(tiny_config, train, test, tmp_path / "s")
    before = snapshot(tmp_path / "s")
    with pytest.raises(ValueError, match=r"never trained on in this store: \[987654321\].*test"):
        ens.unlearn([int(test.ids[0]), 987654321])
    assert snapshot(tmp_path / "s") == before


def test_crash_before_the_swap_is_finished_on_reopen(tiny, tiny_config, tmp_path, monkeypatch):
    train, test = tiny
    victim = int(test.ids[2])
    path = tmp_path / "s"
    ens = fit(tiny_config, train, test, path)
    old = ens.manifest_.test

    def crash(*a, **k):
        raise Crash("power cut before the manifest swap")

    monkeypatch.setattr(deletion, "write_manifest", crash)
    with pytest.raises(Crash):
        ens.unlearn([victim])
    # the new split was written, but the live state still holds the row
    m = read_manifest(Store(str(path)))
    assert m.test == old and len(Store(str(path)).list("test")) == 2
    assert victim in set(ens.test_data().ids.tolist())
    monkeypatch.undo()

    reopened = SISAEnsemble.open(str(path), backend="local")
    assert [r.status for r in Ledger(reopened.store_).requests().values()] == ["completed"]
    assert victim not in set(reopened.test_data().ids.tolist())
    assert len(reopened.test_data()) == len(test) - 1
    assert reopened.store_.list("test") == [reopened.manifest_.test.path]


def test_restored_test_split_is_deleted_again(tiny, tiny_config, tmp_path):
    train, test = tiny
    victim = int(test.ids[4])
    path, backup = tmp_path / "s", tmp_path / "backup"
    fit(tiny_config, train, test, path)
    shutil.copytree(path, backup)
    SISAEnsemble.open(str(path), backend="local").unlearn([victim])
    for part in ("manifest.json", "manifests", "test", "shards"):  # a restore without the ledger
        src, dst = backup / part, path / part
        if dst.is_dir():
            shutil.rmtree(dst)
            shutil.copytree(src, dst)
        else:
            shutil.copy(src, dst)

    ens = SISAEnsemble.open(str(path), backend="local", recover=False)
    assert ens.resurrected_ == [victim]
    ens.recover()
    assert ens.resurrected_ == []
    assert victim not in set(ens.test_data().ids.tolist())


def test_store_with_unversioned_test_split(tiny, tiny_config, tmp_path):
    """Stores written before the manifest named the test split keep it at data/test.parquet."""
    train, test = tiny
    victim = int(test.ids[1])
    ens = fit(tiny_config, train, test, tmp_path / "s")
    store = ens.store_
    store.write_bytes(LEGACY_TEST_DATA, store.read_bytes(ens.manifest_.test.path))
    old = ens.manifest_.copy()
    old.test = None
    with store.writer_lock() as lock:
        write_manifest(store, old, lock)
    store.delete(ens.manifest_.test.path)

    ens = SISAEnsemble.open(str(tmp_path / "s"), backend="local")
    assert len(ens.test_data()) == len(test)
    rep = ens.unlearn([victim])
    assert rep.in_test_split == [victim]
    assert not store.exists(LEGACY_TEST_DATA)
    assert ens.manifest_.test is not None and len(ens.test_data()) == len(test) - 1


def test_cli_delete_reports_the_test_split(tiny, tiny_config, tmp_path, capsys):
    train, test = tiny
    store = str(tmp_path / "s")
    fit(tiny_config, train, test, store)
    victim = int(test.ids[9])
    assert main(["delete", "--store", store, "--backend", "local", "--ids", str(victim)]) == 0
    assert f"removed from the stored test split (no retraining): [{victim}]" in capsys.readouterr().out
    assert main(["status", "--store", store, "--backend", "local", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_test_live"] == len(test) - 1


def test_deletion_service_accepts_and_applies_a_test_split_id(tiny, tiny_config, tmp_path):
    from sisa_ray.service import DeletionService

    train, test = tiny
    victim = int(test.ids[3])
    fit(tiny_config, train, test, tmp_path / "s")
    svc = DeletionService(SISAEnsemble.open(str(tmp_path / "s"), backend="local"))
    try:
        assert svc.submit([victim], request_id="t")["status"] == "pending"
        report = svc.wait("t")["report"]
    finally:
        svc.close()
    assert report["in_test_split"] == [victim] and report["shards"] == []
    ens = SISAEnsemble.open(str(tmp_path / "s"), backend="local")
    assert victim not in set(ens.test_data().ids.tolist())


def test_corrupt_test_split_is_refused_before_acknowledging(tiny, tiny_config, tmp_path):
    from sisa_ray.core.store import StoreError

    train, test = tiny
    ens = fit(tiny_config, train, test, tmp_path / "s")
    rel = ens.manifest_.test.path
    table = ens.store_.read_table(rel)
    ens.store_.write_table(rel, table.slice(1))  # altered behind the manifest's back
    before = snapshot(tmp_path / "s")
    with pytest.raises(StoreError, match="stored test split.*corrupt"):
        ens.unlearn([int(test.ids[5])])
    assert snapshot(tmp_path / "s") == before
    assert Ledger(ens.store_).requests() == {}
