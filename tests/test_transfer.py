"""Transfer from public data: a frozen backbone, a head per shard, exactness kept."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from sisa_ray.core.checkpoint import states_identical
from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.core.plan import assign
from sisa_ray.core.store import Store, StoreError
from sisa_ray.ensemble import SISAEnsemble
from sisa_ray.shard import ShardWorker
from sisa_ray.transfer import (
    BACKBONE_FILE,
    cached_embedding,
    embed,
    load_backbone,
    pretrain,
    public_split,
)

CONFIG = SISAConfig(
    sharding=ShardingConfig(n_shards=3, n_slices=2, seed=5),
    training=TrainingConfig(model="mlp", epochs=2, batch_size=16, hidden=16),
)
PRETRAIN = TrainingConfig(model="mlp", epochs=2, batch_size=32, hidden=24)


@pytest.fixture(scope="module")
def split(digits):
    train, test = digits
    public, rest = public_split(train.take(np.arange(400)), 150, seed=3)
    return public, rest, test.take(np.arange(60))


@pytest.fixture(scope="module")
def backbone(split):
    return pretrain(split[0], PRETRAIN, seed=1)


@pytest.fixture(scope="module")
def conv_backbone(split):
    """A batch-norm conv backbone pretrained with augmentation, the benchmark's kind."""
    return pretrain(split[0], dataclasses.replace(PRETRAIN, model="wide_cnn", epochs=1), seed=1,
                    augment="shift-flip")


def fit(tmp_path, name, data, backbone, test=None, config=CONFIG):
    return SISAEnsemble(config, store=str(tmp_path / name), backend="local",
                        backbone=backbone).fit(data, test)


def test_public_split_is_keyed_and_disjoint(digits):
    train = digits[0].take(np.arange(100))
    public, rest = public_split(train, 30, seed=3)
    assert len(public) == 30 and len(rest) == 70
    assert np.intersect1d(public.ids, rest.ids).size == 0
    again, _ = public_split(train, 30, seed=3)
    np.testing.assert_array_equal(again.ids, public.ids)
    other, _ = public_split(train, 30, seed=4)
    assert set(other.ids.tolist()) != set(public.ids.tolist())


def test_backbone_file_round_trips_with_weights_only(split, backbone):
    public = split[0]
    bb = load_backbone(backbone, "bb")
    assert bb.arch == "mlp" and bb.hidden == 24 and bb.n_classes == 10
    assert bb.input_shape == public.input_shape
    np.testing.assert_array_equal(bb.public_ids, np.sort(public.ids))
    assert bb.sha256 == hashlib.sha256(backbone).hexdigest()
    assert pretrain(public, PRETRAIN, seed=1) == backbone  # deterministic bytes
    assert pretrain(public, PRETRAIN, seed=2) != backbone


def test_backbone_file_without_keys_is_refused():
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"arch": "mlp", "state_dict": {}}, buf)
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['input_shape'"):
        load_backbone(buf.getvalue(), "x.pt")


def test_features_are_per_sample(split, backbone):
    module = load_backbone(backbone, "bb").module()
    x = split[1].features[:40]
    all_rows = embed(module, x)
    assert all_rows.shape == (40, 24)
    for k in (0, 17, 39):
        np.testing.assert_array_equal(all_rows[k:k + 1], embed(module, x[k:k + 1]))
    np.testing.assert_array_equal(all_rows[5:9], embed(module, x[5:9]))


def test_config_names_the_backbone(split, backbone, tmp_path):
    public, rest, _ = split
    ens = fit(tmp_path, "a", rest, backbone)
    assert ens.config_.training.backbone == hashlib.sha256(backbone).hexdigest()
    other = pretrain(public, dataclasses.replace(PRETRAIN, epochs=1), seed=1)
    ens2 = fit(tmp_path, "b", rest, other)
    plain = fit(tmp_path, "c", rest, None)
    hashes = {ens.meta_["config_hash"], ens2.meta_["config_hash"], plain.meta_["config_hash"]}
    assert len(hashes) == 3
    # the stored backbone is the file itself, byte for byte
    assert Store(str(tmp_path / "a")).read_bytes(BACKBONE_FILE) == backbone


def test_options_at_default_keep_old_hashes():
    # hashes of the configs before deletion-aware placement and backbones existed
    assert SISAConfig().config_hash() == "11f42e5a221dd2bb"
    cnn = SISAConfig(training=TrainingConfig(model="cnn", epochs=5))
    assert cnn.config_hash() == "8e6fd5339d8e409a"


def test_bad_backbone_config_is_refused():
    with pytest.raises(ValueError, match="'backbone' parameter of TrainingConfig"):
        TrainingConfig(backbone="abc")
    with pytest.raises(ValueError, match="must be 'mlp' with a backbone. Got 'cnn'"):
        TrainingConfig(model="cnn", backbone="0" * 64)


@pytest.mark.parametrize("kind", ["backbone", "conv_backbone"])
def test_unlearn_with_cached_features_equals_fresh_fit(split, kind, request, tmp_path):
    backbone = request.getfixturevalue(kind)
    _, rest, test = split
    ens = fit(tmp_path, "s", rest, backbone, test)
    sha = ens.config_.training.backbone
    module = load_backbone(backbone, "bb").module()
    # every shard's data file caches its features
    for e in ens.manifest_.shards:
        table = ens.store_.read_table(e.data.path)
        cached = cached_embedding(table, sha)
        assert cached is not None and cached.shape == (e.n_samples, 24)
    shard, slice_ = assign(rest.ids, ens.config_.sharding)
    picks = [int(rest.ids[(shard == s) & (slice_ == k)][0]) for s in range(3) for k in (0, 1)]
    rep = ens.unlearn(picks)
    assert sorted(r.shard for r in rep.shards) == [0, 1, 2]
    # the cache went with the samples, and holds exactly what a fresh computation gives
    for e in ens.manifest_.shards:
        table = ens.store_.read_table(e.data.path)
        ids = table.column("id").to_numpy()
        assert not np.isin(picks, ids).any()
        cached = cached_embedding(table, sha)
        assert cached.shape == (ids.size, 24)
        np.testing.assert_array_equal(cached, embed(module, _rows(rest, ids).features))
    fresh = fit(tmp_path, "fresh", rest.without_ids(np.asarray(picks)), backbone)
    mine, theirs = ens.shard_states(all_steps=True), fresh.shard_states(all_steps=True)
    for s, (a, b) in enumerate(zip(mine, theirs)):
        assert len(a) == len(b) == 2
        for step, (x, y) in enumerate(zip(a, b)):
            assert states_identical(x, y) == [], f"shard {s} step {step}"
    p1, a1 = ens.shard_proba(test.features)
    p2, a2 = fresh.shard_proba(test.features)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(ens.predict(test.features), fresh.predict(test.features))
    assert ens.verify().identical


def _translations(img: np.ndarray, k: int):
    """Every translation of ``img`` (C, H, W) by up to ``k`` pixels, zero-filled."""
    padded = np.pad(img, ((0, 0), (k, k), (k, k)))
    h, w = img.shape[1:]
    return [padded[:, oy:oy + h, ox:ox + w] for oy in range(2 * k + 1) for ox in range(2 * k + 1)]


@pytest.mark.parametrize("kind", ["shift", "shift-flip"])
def test_augmentation_shifts_and_mirrors_each_image(kind):
    import torch

    from sisa_ray.core.training import seeded
    from sisa_ray.transfer import MAX_SHIFT, augmenter

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((200, 64), dtype=np.float32))  # digits' 8x8, flat
    with seeded(7, torch.device("cpu")):
        out = augmenter(kind, (64,))(x).numpy()
    with seeded(7, torch.device("cpu")):
        again = augmenter(kind, (64,))(x).numpy()
    np.testing.assert_array_equal(out, again)  # its randomness is the seeded stream's
    assert out.shape == x.shape
    mirrored, moved = 0, 0
    for src, got in zip(x.numpy().reshape(-1, 1, 8, 8), out.reshape(-1, 1, 8, 8)):
        plain = [np.array_equal(got, t) for t in _translations(src, MAX_SHIFT)]
        flipped = [np.array_equal(got, t) for t in _translations(src[:, :, ::-1], MAX_SHIFT)]
        assert any(plain) or (kind == "shift-flip" and any(flipped))
        mirrored += not any(plain)
        moved += not (plain[len(plain) // 2] or flipped[len(flipped) // 2])
    assert (mirrored == 0) if kind == "shift" else 60 < mirrored < 140
    assert moved > 150  # 24 of the 25 offsets move the image


def test_pretraining_with_augmentation_is_reproducible_and_checked(split):
    small = dataclasses.replace(PRETRAIN, model="cnn", epochs=1)
    a = pretrain(split[0], small, seed=1, augment="shift")
    assert a == pretrain(split[0], small, seed=1, augment="shift")
    assert a != pretrain(split[0], small, seed=1)
    with pytest.raises(ValueError, match="'augment' parameter must be one of"):
        pretrain(split[0], small, seed=1, augment="rotate")


def _rows(data, ids):
    """Rows of ``data`` in the order of ``ids``."""
    pos = {int(i): k for k, i in enumerate(data.ids)}
    return data.take(np.asarray([pos[int(i)] for i in ids]))


def test_heads_are_small_and_train_on_features(split, backbone, tmp_path):
    ens = fit(tmp_path, "h", split[1], backbone)
    state = ens.shard_states()[0]
    # the head's first layer takes the backbone's 24 features, not the 64 pixels
    assert tuple(state["net.1.weight"].shape) == (16, 24)


def test_public_ids_cannot_be_deleted(split, backbone, tmp_path):
    public, rest, _ = split
    ens = fit(tmp_path, "p", rest, backbone)
    victim = int(public.ids[4])
    with pytest.raises(ValueError, match=rf"public set .*\[{victim}\]"):
        ens.unlearn([victim, int(rest.ids[0])])
    assert ens.status()["ledger"] == SISAEnsemble.open(str(tmp_path / "p"), backend="local") \
        .status()["ledger"]
    assert ens.status()["n_train_live"] == len(rest)
    from sisa_ray.service import DeletionService

    service = DeletionService(ens)
    try:
        with pytest.raises(ValueError, match=rf"public set .*\[{victim}\]"):
            service.submit([victim])
    finally:
        service.close()


def test_public_ids_are_never_sharded(split, backbone, tmp_path):
    public, rest, _ = split
    mixed = rest.take(np.arange(len(rest)))
    from sisa_ray.core.data import SampleSet

    both = SampleSet(ids=np.concatenate([mixed.ids, public.ids[:2]]),
                     features=np.concatenate([mixed.features, public.features[:2]]),
                     labels=np.concatenate([mixed.labels, public.labels[:2]]), n_classes=10)
    with pytest.raises(ValueError, match=rf"{int(np.sort(public.ids[:2])[0])}"):
        fit(tmp_path, "m", both, backbone)


def test_worker_refuses_a_replaced_backbone(split, backbone, tmp_path):
    ens = fit(tmp_path, "w", split[1], backbone)
    other = pretrain(split[0], dataclasses.replace(PRETRAIN, epochs=1), seed=1)
    ens.store_.write_bytes(BACKBONE_FILE, other)
    with pytest.raises(StoreError, match="the backbone was replaced"):
        ShardWorker(ens.store_.uri)


def test_cli_pretrain_train_delete(tmp_path, capsys):
    import json

    from sisa_ray.cli import main
    from sisa_ray.datasets import load_digits

    bb_path = str(tmp_path / "bb.pt")
    code = main(["pretrain", "--dataset", "digits", "--public", "400", "--model", "cnn",
                 "--epochs", "1", "--hidden", "16", "--augment", "shift", "--out", bb_path,
                 "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["n_public"] == 400
    with open(bb_path, "rb") as fh:
        blob = fh.read()
    assert out["sha256"] == hashlib.sha256(blob).hexdigest()
    public = load_backbone(blob, bb_path).public_ids
    store = str(tmp_path / "store")
    code = main(["train", "--store", store, "--backend", "local", "--json", "--dataset", "digits",
                 "--backbone", bb_path, "--shards", "2", "--slices", "2", "--epochs", "1"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0
    # the public samples were held out of the training set
    assert sum(s["n_samples"] for s in res["shards"]) == len(load_digits()[0]) - 400
    code = main(["delete", "--store", store, "--backend", "local", "--ids", str(public[0])])
    err = capsys.readouterr().err
    assert code == 2 and f"[{public[0]}]" in err and "public set" in err


@pytest.mark.ray
def test_ray_workers_train_heads_like_local(ray_session, split, backbone, tmp_path):
    _, rest, test = split
    ens = SISAEnsemble(CONFIG, store=str(tmp_path / "ray"), backend="ray",
                       backbone=backbone).fit(rest, test)
    try:
        victims = rest.ids[[3, 100]].tolist()
        ens.unlearn(victims)
        local = fit(tmp_path, "local", rest.without_ids(np.asarray(victims)), backbone, test)
        for s, (a, b) in enumerate(zip(ens.shard_states(True), local.shard_states(True))):
            for x, y in zip(a, b):
                assert states_identical(x, y) == [], f"shard {s}"
        np.testing.assert_array_equal(ens.shard_proba(test.features)[0],
                                      local.shard_proba(test.features)[0])
    finally:
        ens.close()
