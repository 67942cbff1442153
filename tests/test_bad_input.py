"""Bad input gets a clear error naming the problem and the fix, and changes nothing."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import snapshot, synthetic

from sisa_ray.core.checkpoint import Checkpoint
from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.core.data import SampleSet
from sisa_ray.core.store import StoreError
from sisa_ray.datasets import read_parquet
from sisa_ray.ensemble import NotFittedError, SISAEnsemble


@pytest.fixture
def trained(tiny, tiny_config, tmp_path):
    train, test = tiny
    path = tmp_path / "s"
    ens = SISAEnsemble(tiny_config, store=str(path), backend="local").fit(train, test)
    return ens, path, train


@pytest.mark.parametrize(
    "ids,exc,match",
    [
        ([10**9, -5], ValueError, r"never trained on in this store: \[-5, 1000000000\]"),
        (["a"], TypeError, "must be integers"),
        ([1.5], TypeError, "must be integers"),
        ("3", TypeError, "list of integer sample ids"),
        ([], ValueError, "empty"),
        ([True], TypeError, "must be integers"),
    ],
)
def test_bad_delete_requests_change_nothing(trained, ids, exc, match):
    ens, path, train = trained
    before = snapshot(path)
    with pytest.raises(exc, match=match):
        ens.unlearn(ids)
    assert snapshot(path) == before


def test_unknown_ids_mixed_with_known_delete_nothing(trained):
    ens, path, train = trained
    before = snapshot(path)
    with pytest.raises(ValueError, match=r"\[777777\].*Nothing was deleted"):
        ens.unlearn([int(train.ids[0]), 777777])
    assert snapshot(path) == before


def write(tmp_path, name, **cols):
    p = str(tmp_path / name)
    pq.write_table(pa.table(cols), p)
    return p


def feats(rows):
    return pa.array(rows, type=pa.list_(pa.float32()))


@pytest.mark.parametrize(
    "cols,match",
    [
        ({"id": [1, 1], "label": [0, 1], "features": feats([[0.0], [1.0]])}, r"unique.*\[1\]"),
        ({"id": [1, 2], "features": feats([[0.0], [1.0]])}, r"missing column\(s\) \['label'\]"),
        ({"id": [1, 2], "label": [0, 1], "features": feats([[0.0], [1.0, 2.0]])}, "ragged"),
        ({"id": [1, 2], "label": [0, -1], "features": feats([[0.0], [1.0]])},
         r"labels must lie in \[0, 2\)"),
        ({"id": [1, 2], "label": [0, 1], "features": feats([[0.0], [float("nan")]])},
         r"NaN.*\[2\]"),
        ({"id": [1.0, 2.0], "label": [0, 1], "features": feats([[0.0], [1.0]])},
         "'id' must be int64"),
    ],
)
def test_bad_parquet_is_refused_by_name(tmp_path, cols, match):
    with pytest.raises(ValueError, match=match):
        read_parquet(write(tmp_path, "x.parquet", **cols))


def test_labels_out_of_range_in_sampleset():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*\[5\]"):
        SampleSet(ids=np.arange(3), features=np.zeros((3, 2)), labels=[0, 1, 5], n_classes=3)


def test_store_with_other_config_or_data_is_refused_unchanged(trained, tiny_config):
    ens, path, train = trained
    before = snapshot(path)
    other = SISAConfig(sharding=ShardingConfig(n_shards=4, n_slices=3, seed=12),
                       training=tiny_config.training)
    with pytest.raises(ValueError, match="another config.*new --store"):
        SISAEnsemble(other, store=str(path), backend="local").fit(train)
    with pytest.raises(ValueError, match="other data.*new --store"):
        SISAEnsemble(tiny_config, store=str(path), backend="local").fit(train.take(np.arange(50)))
    assert snapshot(path) == before


def test_non_sisa_directory_is_refused(tmp_path, tiny, tiny_config):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and holds no sisa-ray ensemble"):
        SISAEnsemble(tiny_config, store=str(tmp_path / "s"), backend="local").fit(tiny[0])
    assert (tmp_path / "s" / "precious.txt").read_text() == "keep me"


def test_truncated_checkpoint_is_named_and_nothing_changes(trained, tiny_config):
    ens, path, train = trained
    last = path / ens.manifest_.shards[2].checkpoints[-1].path
    good = last.read_bytes()
    last.write_bytes(good[:300])
    before = snapshot(path)
    # open reads no checkpoint (it starts no worker); the first prediction loads it and names it
    reopened = SISAEnsemble.open(str(path), backend="local")
    with pytest.raises(StoreError, match=r"step_002\.pt' is corrupt.*truncated"):
        reopened.predict(train.features[:3])
    assert snapshot(path) == before
    last.write_bytes(good)

    # a truncated restart point is found before the request is acknowledged
    from sisa_ray.core.plan import assign

    shard, slice_ = assign(train.ids, tiny_config.sharding)
    victim = int(train.ids[(shard == 2) & (slice_ == 2)][0])
    base = path / ens.manifest_.shards[2].checkpoints[1].path
    base.write_bytes(base.read_bytes()[:-10])
    before = snapshot(path)
    with pytest.raises(StoreError, match=r"step_001\.pt' is corrupt"):
        ens.unlearn([victim])
    assert snapshot(path) == before


def test_checkpoints_load_with_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"model_state": Evil()}, buf)
    with pytest.raises(StoreError, match="cannot be read"):
        Checkpoint.from_bytes(buf.getvalue(), where="evil.pt")
    good = Checkpoint(shard=0, step=0, config_hash="h", ids_digest="d", n_samples=1,
                      model_state={"w": torch.ones(2)}, optimizer_state={})
    back = Checkpoint.from_bytes(good.to_bytes(), where="good.pt")
    assert torch.equal(back.model_state["w"], torch.ones(2))


def test_predict_before_fit_says_what_to_call():
    with pytest.raises(NotFittedError, match=r"Call fit\(data\) first"):
        SISAEnsemble(SISAConfig(), backend="local").predict(np.zeros((1, 4)))


def test_wrong_feature_shape_at_predict(trained):
    ens, _, _ = trained
    with pytest.raises(ValueError, match=r"trained on \(1, 8, 8\)"):
        ens.predict(np.zeros((2, 10)))


def test_empty_shard_data_is_defined(tmp_path):
    data = synthetic(n=6)
    cfg = SISAConfig(sharding=ShardingConfig(n_shards=8, n_slices=1),
                     training=TrainingConfig(epochs=1, hidden=4))
    ens = SISAEnsemble(cfg, store=str(tmp_path / "s"), backend="local").fit(data)
    _, active = ens.shard_proba(data.features)
    assert active.sum() == len({int(s) for s in
                                __import__("sisa_ray.core.plan", fromlist=["assign"]).assign(
                                    data.ids, cfg.sharding)[0]})
    assert ens.predict(data.features).shape == (6,)


def test_slices_far_beyond_the_data_are_refused_before_anything_is_written(tmp_path, tiny):
    train, _ = tiny
    cfg = SISAConfig(sharding=ShardingConfig(n_shards=4, n_slices=100000),
                     training=TrainingConfig(epochs=1))
    with pytest.raises(ValueError, match=r"100000 slices per shard .* Use at most 75 slices"):
        SISAEnsemble(cfg, store=str(tmp_path / "s"), backend="local").fit(train)
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
