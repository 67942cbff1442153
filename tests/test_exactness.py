"""The headline property: unlearn(ids) == fit(data - ids), bit for bit (local backend)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import snapshot

from sisa_ray.core.checkpoint import states_identical
from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.core.plan import assign
from sisa_ray.ensemble import SISAEnsemble


def fit(config, data, tmp_path, name, test=None):
    return SISAEnsemble(config, store=str(tmp_path / name), backend="local").fit(data, test)


def assert_exact(ens, config, train, test, deleted, tmp_path):
    """A fresh fit on train minus deleted has identical weights (every step) and predictions."""
    fresh = fit(config, train.without_ids(np.asarray(deleted)), tmp_path, "fresh")
    mine, theirs = ens.shard_states(all_steps=True), fresh.shard_states(all_steps=True)
    assert len(mine) == len(theirs) == config.sharding.n_shards
    for s, (a, b) in enumerate(zip(mine, theirs)):
        assert len(a) == len(b) == config.sharding.n_slices
        for step, (x, y) in enumerate(zip(a, b)):
            assert states_identical(x, y) == [], f"shard {s} step {step} differs"
    p1, a1 = ens.shard_proba(test.features)
    p2, a2 = fresh.shard_proba(test.features)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(ens.predict(test.features), fresh.predict(test.features))
    return fresh


def shard_slice(train, config):
    return assign(train.ids, config.sharding)


def test_single_id(tiny, tiny_config, tmp_path):
    train, test = tiny
    ens = fit(tiny_config, train, tmp_path, "s", test)
    rep = ens.unlearn([int(train.ids[10])])
    assert rep.deleted == [int(train.ids[10])]
    assert_exact(ens, tiny_config, train, test, [train.ids[10]], tmp_path)


def test_many_ids_across_shards_and_slices(tiny, tiny_config, tmp_path):
    train, test = tiny
    shard, slice_ = shard_slice(train, tiny_config)
    picks = []
    for s in range(3):
        for k in range(3):
            picks.append(int(train.ids[(shard == s) & (slice_ == k)][0]))
    ens = fit(tiny_config, train, tmp_path, "s", test)
    rep = ens.unlearn(picks)
    assert sorted(r.shard for r in rep.shards) == [0, 1, 2]
    assert all(r.restart_slice == 0 for r in rep.shards)
    assert_exact(ens, tiny_config, train, test, picks, tmp_path)


def test_restart_slice_and_untouched_shards_byte_for_byte(tiny, tiny_config, tmp_path):
    train, test = tiny
    shard, slice_ = shard_slice(train, tiny_config)
    victim = int(train.ids[(shard == 2) & (slice_ == 1)][0])
    ens = fit(tiny_config, train, tmp_path, "s", test)
    before = snapshot(tmp_path / "s" / "shards")
    m_before = ens.manifest_.copy()
    rep = ens.unlearn([victim])
    assert [(r.shard, r.restart_slice) for r in rep.shards] == [(2, 1)]
    after = snapshot(tmp_path / "s" / "shards")
    for rel, blob in before.items():
        if not rel.startswith("0002/"):
            assert after[rel] == blob, f"untouched file {rel} changed"
    new2 = ens.manifest_.shards[2]
    # the last clean slice (step 0) is reused, steps 1 and 2 are new
    assert new2.checkpoints[0] == m_before.shards[2].checkpoints[0]
    assert all(c.path.startswith("shards/0002/v000002/") for c in new2.checkpoints[1:])
    for s in (0, 1, 3):
        assert ens.manifest_.shards[s].to_dict() == m_before.shards[s].to_dict()
    # retrained sample-steps: steps 1 and 2 of shard 2, minus the deleted sample
    counts = np.asarray(new2.slice_counts)
    from sisa_ray.core.plan import epochs_per_step, sample_steps

    assert rep.retrained_sample_steps == sample_steps(
        counts, epochs_per_step(tiny_config.training, 3), from_step=1
    )
    assert_exact(ens, tiny_config, train, test, [victim], tmp_path)


def test_whole_slice(tiny, tiny_config, tmp_path):
    train, test = tiny
    shard, slice_ = shard_slice(train, tiny_config)
    whole = train.ids[(shard == 1) & (slice_ == 2)]
    ens = fit(tiny_config, train, tmp_path, "s", test)
    ens.unlearn(whole.tolist())
    assert ens.manifest_.shards[1].slice_counts[2] == 0
    assert_exact(ens, tiny_config, train, test, whole, tmp_path)


def test_whole_shard_abstains(tiny, tiny_config, tmp_path):
    train, test = tiny
    shard, _ = shard_slice(train, tiny_config)
    whole = train.ids[shard == 3]
    ens = fit(tiny_config, train, tmp_path, "s", test)
    ens.unlearn(whole.tolist())
    _, active = ens.shard_proba(test.features)
    assert active.tolist() == [True, True, True, False]
    assert ens.status()["shards"][3]["abstains"]
    assert_exact(ens, tiny_config, train, test, whole, tmp_path)


def test_two_successive_deletes_and_repeats(tiny, tiny_config, tmp_path):
    train, test = tiny
    ens = fit(tiny_config, train, tmp_path, "s", test)
    first = train.ids[[3, 50, 120]].tolist()
    second = train.ids[[7, 50, 200]].tolist()
    ens.unlearn(first)
    rep = ens.unlearn(second)
    assert rep.already_deleted == [int(train.ids[50])]
    assert sorted(rep.deleted) == sorted([int(train.ids[7]), int(train.ids[200])])
    gen = ens.manifest_.generation
    again = ens.unlearn(first)
    assert again.duplicate_request
    assert ens.manifest_.generation == gen
    assert ens.status()["ledger"]["requests"] == 2
    assert_exact(ens, tiny_config, train, test, first + second, tmp_path)


def test_same_request_id_twice_is_one_deletion(tiny, tiny_config, tmp_path):
    train, test = tiny
    ens = fit(tiny_config, train, tmp_path, "s", test)
    r1 = ens.unlearn([int(train.ids[1])], request_id="gdpr-1")
    gen = ens.manifest_.generation
    r2 = ens.unlearn([int(train.ids[1])], request_id="gdpr-1")
    assert r2.duplicate_request and not r1.duplicate_request
    assert ens.manifest_.generation == gen
    with pytest.raises(ValueError, match="already used for other ids"):
        ens.unlearn([int(train.ids[2])], request_id="gdpr-1")


@pytest.mark.parametrize("model,optimizer", [("cnn", "sgd"), ("wide_cnn", "adam"),
                                             ("resnet18", "adam")])
def test_exact_with_conv_models(tiny, tmp_path, model, optimizer):
    train, test = tiny
    train, test = train.take(np.arange(96)), test.take(np.arange(20))
    config = SISAConfig(
        sharding=ShardingConfig(n_shards=2, n_slices=2, seed=3),
        training=TrainingConfig(model=model, epochs=2, batch_size=16, hidden=16,
                                optimizer=optimizer, lr=0.01),
    )
    ens = fit(config, train, tmp_path, "s", test)
    victim = [int(train.ids[5])]
    ens.unlearn(victim)
    assert_exact(ens, config, train, test, victim, tmp_path)


def test_verify_reports_identical_and_catches_tampering(tiny, tiny_config, tmp_path):
    train, test = tiny
    ens = fit(tiny_config, train, tmp_path, "s", test)
    ens.unlearn(train.ids[[4, 40]].tolist())
    rep = ens.verify()
    assert rep.identical and rep.predictions_identical
    assert all(s["identical"] and s["steps"] == 3 for s in rep.shards)
    # Replace shard 0's live checkpoints by shard 1's (valid files, wrong weights): verify fails.
    m = ens.manifest_
    from sisa_ray.core.manifest import write_manifest

    m.shards[0].checkpoints = list(m.shards[1].checkpoints)
    m.generation += 1
    with ens.store_.writer_lock() as lock:
        write_manifest(ens.store_, m, lock)
    bad = SISAEnsemble.open(ens.store_.uri, backend="local").verify()
    assert not bad.identical
    assert [s["shard"] for s in bad.shards if not s["identical"]] == [0]


def test_deletion_dispatches_the_costliest_retrain_first(tiny, tiny_config, tmp_path):
    """A shard retrained from slice 0 goes to the workers before one retrained from its last
    slice, so the wall time does not end with one long job started last; the report stays in
    shard order."""
    train, test = tiny
    shard, slice_ = shard_slice(train, tiny_config)
    last = tiny_config.sharding.n_slices - 1
    cheap = int(train.ids[(shard == 0) & (slice_ == last)][0])
    costly = int(train.ids[(shard == 3) & (slice_ == 0)][0])
    ens = fit(tiny_config, train, tmp_path, "s", test)
    seen = []
    run_jobs = ens.executor.run_jobs

    def recording(jobs, progress=None):
        seen.extend((j.shard, j.start_step) for j in jobs)
        return run_jobs(jobs, progress)

    ens.executor.run_jobs = recording
    rep = ens.unlearn([cheap, costly])
    assert seen == [(3, 0), (0, last)]
    assert [(r.shard, r.restart_slice) for r in rep.shards] == [(0, last), (3, 0)]
    assert_exact(ens, tiny_config, train, test, [cheap, costly], tmp_path)
