"""Deletion-aware sharding (SISA paper, Section VI): placement by prior or group, exactness kept."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sisa_ray.core import plan as plan_mod
from sisa_ray.core.checkpoint import states_identical
from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.core.plan import (
    PLACEMENT_FILE,
    assign,
    keyed_hash,
    placement_shards,
    with_placement,
)
from sisa_ray.ensemble import SISAEnsemble

SHARDING = ShardingConfig(n_shards=4, n_slices=2, seed=9, placement="prior", hot_shards=1,
                          hot_prior=0.5)
TRAINING = TrainingConfig(model="mlp", epochs=2, batch_size=16, hidden=16)


def priors(ids: np.ndarray) -> np.ndarray:
    """One sample in ten is likely to be deleted."""
    return np.where(ids % 10 == 3, 0.9, 0.02)


def test_prior_placement_oracle():
    ids = np.arange(200, dtype=np.int64)
    shard = placement_shards(ids, priors(ids), SHARDING)
    h = keyed_hash(ids, plan_mod._ASSIGN_TAG, 9, 4, 2)
    hot = ids % 10 == 3
    np.testing.assert_array_equal(shard[hot], (h[hot] % np.uint64(1)).astype(np.int64))
    np.testing.assert_array_equal(shard[~hot], 1 + (h[~hot] % np.uint64(3)).astype(np.int64))
    assert set(shard[hot].tolist()) == {0} and set(shard[~hot].tolist()) == {1, 2, 3}
    # the threshold is inclusive: prior == hot_prior is hot
    assert placement_shards(ids[:1], np.array([0.5]), SHARDING)[0] == 0


def test_group_placement_keeps_a_group_together():
    sharding = dataclasses.replace(SHARDING, placement="group")
    ids = np.arange(300, dtype=np.int64)
    groups = ids // 7
    shard = placement_shards(ids, groups, sharding)
    for g in np.unique(groups):
        assert np.unique(shard[groups == g]).size == 1
    expected = (keyed_hash(groups, plan_mod._GROUP_TAG, 9, 4) % np.uint64(4)).astype(np.int64)
    np.testing.assert_array_equal(shard, expected)
    assert np.unique(shard).size == 4


def test_assign_follows_the_recorded_table():
    ids = np.arange(100, dtype=np.int64) * 3
    sharding = with_placement(SHARDING, ids, priors(ids))
    shard, slice_ = assign(ids, sharding)
    np.testing.assert_array_equal(shard, placement_shards(ids, priors(ids), sharding))
    # slices stay the keyed hash of the id
    plain = ShardingConfig(n_shards=4, n_slices=2, seed=9)
    np.testing.assert_array_equal(slice_, assign(ids, plain)[1])
    # an id the table does not hold gets its hashed shard (where it is then found missing)
    stranger = np.array([10**9 + 1], dtype=np.int64)
    assert assign(stranger, sharding)[0][0] == assign(stranger, plain)[0][0]


def test_bad_placement_input_is_refused():
    with pytest.raises(ValueError, match="'hot_shards' parameter of ShardingConfig must be < "
                                         "n_shards"):
        ShardingConfig(n_shards=2, placement="prior", hot_shards=2)
    with pytest.raises(ValueError, match="'placement_digest' parameter"):
        ShardingConfig(placement_digest="abc")
    ids = np.arange(5, dtype=np.int64)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        with_placement(SHARDING, ids, np.array([0.1, 0.2, 1.5, 0.0, 0.3]))
    with pytest.raises(ValueError, match="one value per id"):
        with_placement(SHARDING, ids, np.zeros(4))
    with pytest.raises(ValueError, match="not loaded"):
        assign(ids, dataclasses.replace(SHARDING, placement_digest="feedfacefeedface"))


def fit(tmp_path, name, data, sharding, test=None):
    config = SISAConfig(sharding=sharding, training=TRAINING)
    return SISAEnsemble(config, store=str(tmp_path / name), backend="local").fit(data, test)


def test_unlearn_hot_ids_is_exact_and_touches_only_hot_shards(tiny, tmp_path):
    train, test = tiny
    sharding = with_placement(SHARDING, train.ids, priors(train.ids))
    ens = fit(tmp_path, "s", train, sharding, test)
    sizes = [e.n_samples for e in ens.manifest_.shards]
    assert sizes[0] == int((train.ids % 10 == 3).sum())
    hot = train.ids[train.ids % 10 == 3][:5].tolist()
    rep = ens.unlearn(hot)
    assert [r.shard for r in rep.shards] == [0]
    # a fresh fit computes the placement again from the reduced data's priors
    reduced = train.without_ids(np.asarray(hot))
    fresh = fit(tmp_path, "fresh", reduced, with_placement(SHARDING, reduced.ids,
                                                           priors(reduced.ids)))
    for s, (a, b) in enumerate(zip(ens.shard_states(all_steps=True),
                                   fresh.shard_states(all_steps=True))):
        for step, (x, y) in enumerate(zip(a, b)):
            assert states_identical(x, y) == [], f"shard {s} step {step}"
    np.testing.assert_array_equal(ens.shard_proba(test.features)[0],
                                  fresh.shard_proba(test.features)[0])
    assert ens.verify().identical


def test_store_records_the_placement(tiny, tmp_path):
    train, _ = tiny
    sharding = with_placement(SHARDING, train.ids, priors(train.ids))
    fit(tmp_path, "r", train, sharding)
    expected = assign(train.ids, sharding)[0]
    plan_mod._PLACEMENTS.clear()  # as in a new process: only the store knows the placement
    ens = SISAEnsemble.open(str(tmp_path / "r"), backend="local")
    np.testing.assert_array_equal(assign(train.ids, ens.config_.sharding)[0], expected)
    # a cold id deleted by a later process goes to its recorded (cold) shard
    cold = int(train.ids[train.ids % 10 == 4][0])
    rep = ens.unlearn([cold])
    assert rep.shards[0].shard == int(expected[train.ids == cold][0]) >= 1
    # an altered placement file is refused by name
    table = ens.store_.read_table(PLACEMENT_FILE)
    import pyarrow as pa

    shard = table.column("shard").to_numpy().copy()
    shard[0] = (shard[0] + 1) % 4
    ens.store_.write_table(PLACEMENT_FILE, pa.table({"id": table.column("id"), "shard": shard}))
    plan_mod._PLACEMENTS.clear()
    with pytest.raises(ValueError, match="placement.parquet was altered"):
        SISAEnsemble.open(str(tmp_path / "r"), backend="local")


def test_cli_places_by_a_parquet_column(tiny, tmp_path, capsys):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sisa_ray.cli import main
    from sisa_ray.datasets import write_parquet

    train, _ = tiny
    path = str(tmp_path / "train.parquet")
    write_parquet(train, path)
    table = pq.read_table(path)
    # rows shuffled against the ids, so the column is matched by id, not by position
    table = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    ids = table.column("id").to_numpy()
    table = table.append_column("deletion_prior", pa.array(priors(ids)))
    pq.write_table(table, path)
    store = str(tmp_path / "store")
    code = main(["train", "--store", store, "--backend", "local", "--json", "--dataset",
                 f"parquet:{path}", "--shards", "4", "--slices", "2", "--epochs", "1",
                 "--placement", "prior", "--hot-shards", "1"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [s["n_samples"] for s in res["shards"]][0] == int((train.ids % 10 == 3).sum())
    hot = int(train.ids[train.ids % 10 == 3][0])
    assert main(["delete", "--store", store, "--backend", "local", "--json", "--ids",
                 str(hot)]) == 0
    assert [s["shard"] for s in json.loads(capsys.readouterr().out)["shards"]] == [0]


def test_streamed_parquet_with_a_placement_is_refused(tiny, tmp_path):
    from sisa_ray.datasets import write_parquet
    from sisa_ray.ingest import ParquetSource

    train, _ = tiny
    write_parquet(train, str(tmp_path / "t.parquet"))
    sharding = with_placement(SHARDING, train.ids, priors(train.ids))
    with pytest.raises(ValueError, match="needs the training data in memory"):
        fit(tmp_path, "p", ParquetSource(str(tmp_path / "t.parquet")), sharding)
