"""Micro-batches: a mini-batch's gradient as the in-order sum of its micro-batches', each computed
on one thread, so the bits do not depend on how many threads compute them, and a deletion that
retrains one shard on every idle core reproduces a fit that gave each shard one core."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sisa_ray.core.checkpoint import states_identical
from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.core.plan import assign
from sisa_ray.core.training import (
    deterministic_torch,
    init_seed,
    make_optimizer,
    micro_bounds,
    train_steps,
)
from sisa_ray.ensemble import SISAEnsemble
from sisa_ray.models import build_model


def test_micro_bounds_split_a_batch_contiguously():
    assert micro_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert micro_bounds(2, 4) == [(0, 1), (1, 2)]  # never an empty micro-batch
    for n in range(1, 40):
        for parts in range(1, 9):
            b = micro_bounds(n, parts)
            assert b[0][0] == 0 and b[-1][1] == n
            assert all(x[1] == y[0] for x, y in zip(b, b[1:]))
            sizes = [stop - start for start, stop in b]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def _train(data, training, parallel, n_slices=2):
    sharding = ShardingConfig(n_shards=1, n_slices=n_slices, seed=5)
    shape, n_classes = data.input_shape, data.n_classes
    model = build_model(training.model, shape, n_classes, hidden=training.hidden,
                        seed=init_seed(sharding, 0))
    opt = make_optimizer(model, training)
    slice_of = assign(data.ids, sharding)[1]
    with deterministic_torch(training.threads):
        for _ in train_steps(model, opt, data.features, data.labels, data.ids, slice_of,
                             sharding=sharding, training=training, shard=0, start_step=0,
                             device=torch.device("cpu"), task=data.task, parallel=parallel):
            pass
    return {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()


@pytest.mark.parametrize("model,optimizer", [("mlp", "adam"), ("cnn", "sgd")])
def test_bits_do_not_depend_on_the_threads(tiny, model, optimizer):
    train, _ = tiny
    data = train.take(np.arange(150))
    # 150 samples in batches of 20: a last batch of 10 makes micro-batches of unequal sizes
    training = TrainingConfig(model=model, epochs=2, batch_size=20, hidden=16, lr=0.01,
                              optimizer=optimizer, micro_batches=3)
    one, opt_one = _train(data, training, parallel=1)
    for parallel in (2, 3, 8):
        other, opt_other = _train(data, training, parallel=parallel)
        assert states_identical(one, other) == [], f"parallel={parallel} changed the weights"
        for a, b in zip(opt_one["state"].values(), opt_other["state"].values()):
            assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    # the micro-batches are what the bits follow: another split is another model
    two, _ = _train(data, TrainingConfig(**{**training.__dict__, "micro_batches": 2}), 2)
    assert states_identical(one, two) != []


def test_regression_bits_do_not_depend_on_the_threads():
    from sisa_ray.datasets import load_diabetes

    data = load_diabetes()[0].take(np.arange(120))
    training = TrainingConfig(model="mlp", epochs=2, batch_size=16, hidden=16, lr=0.01,
                              micro_batches=4)
    one, _ = _train(data, training, parallel=1)
    assert states_identical(one, _train(data, training, parallel=4)[0]) == []
    assert states_identical(one, _train(data, TrainingConfig(
        **{**training.__dict__, "micro_batches": 1}), parallel=1)[0]) != []


def test_micro_batches_train_as_well(tiny):
    """The sum over micro-batches of loss / batch size is the mini-batch's mean loss: the
    model trains to the accuracy of unsplit batches (different bits, same optimisation)."""
    train, test = tiny
    config = SISAConfig(sharding=ShardingConfig(n_shards=1, n_slices=1, seed=0),
                        training=TrainingConfig(model="mlp", epochs=8, batch_size=16, hidden=32))
    split = SISAConfig(sharding=config.sharding,
                       training=TrainingConfig(**{**config.training.__dict__, "micro_batches": 4}))
    accs = [SISAEnsemble(c, backend="local").fit(train).score(test) for c in (config, split)]
    assert accs[1] > 0.6 and abs(accs[0] - accs[1]) < 0.05, accs


def test_bad_micro_batches_are_refused_by_name():
    with pytest.raises(ValueError, match=r"'micro_batches' .* int >= 1"):
        TrainingConfig(micro_batches=0)
    with pytest.raises(ValueError, match=r"at most batch_size \(8\)"):
        TrainingConfig(batch_size=8, micro_batches=9)
    with pytest.raises(ValueError, match=r"needs threads=1"):
        TrainingConfig(threads=2, micro_batches=2)
    with pytest.raises(ValueError, match=r"'wide_cnn': its batch norm .* \(mlp, cnn\)"):
        TrainingConfig(model="wide_cnn", micro_batches=2)
    with pytest.raises(ValueError, match=r"on 'cuda' leave it at 1"):
        TrainingConfig(device="cuda", micro_batches=2)


def test_a_model_that_draws_random_numbers_is_refused():
    from sisa_ray.core.training import MicroBatches

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="with Dropout: its random draws"):
        MicroBatches(net, "classification", parts=2, parallel=2)


def test_existing_stores_keep_their_hash():
    """micro_batches=1 is how every store trained before the option existed."""
    assert SISAConfig().config_hash() == "11f42e5a221dd2bb"
    split = SISAConfig(training=TrainingConfig(micro_batches=2))
    assert split.config_hash() != SISAConfig().config_hash()
    assert SISAConfig.from_dict(split.to_dict()) == split


def test_deletion_on_idle_cores_is_exact_on_ray(ray_session, tiny, tmp_path):
    """The fit trains two shards at once on the two workers (one core each); the deletion
    retrains one shard and gives it both cores; a fresh fit on the rest gives the same bits."""
    train, test = tiny
    config = SISAConfig(
        sharding=ShardingConfig(n_shards=2, n_slices=2, seed=4),
        training=TrainingConfig(model="mlp", epochs=3, batch_size=16, hidden=32,
                                micro_batches=2),
    )
    ens = SISAEnsemble(config, store=str(tmp_path / "s"), backend="ray").fit(train, test)
    assert ens.executor.n_workers() == 2
    assert [r["threads"] for r in ens.fit_results_] == [1, 1]
    victim = int(train.ids[7])
    rep = ens.unlearn([victim])
    assert [s.threads for s in rep.shards] == [2]
    fresh = SISAEnsemble(config, store=str(tmp_path / "fresh"), backend="ray").fit(
        train.without_ids(np.asarray([victim])), test)
    for s, (a, b) in enumerate(zip(ens.shard_states(all_steps=True),
                                   fresh.shard_states(all_steps=True))):
        for step, (x, y) in enumerate(zip(a, b)):
            assert states_identical(x, y) == [], f"shard {s} step {step} differs"
    np.testing.assert_array_equal(ens.predict(test.features), fresh.predict(test.features))


def test_the_cli_records_micro_batches_and_refuses_a_batch_norm_model(tmp_path, capsys):
    from sisa_ray.cli import main

    store = tmp_path / "bn"
    code = main(["train", "--dataset", "digits", "--model", "wide_cnn", "--micro-batches", "2",
                 "--store", str(store), "--backend", "local", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "its batch norm" in err, err
    assert not store.exists()  # refused before anything was written
    store = tmp_path / "mlp"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--shards", "2", "--slices",
                 "1", "--micro-batches", "2", "--store", str(store), "--backend", "local",
                 "--quiet"]) == 0
    meta = json.loads((store / "store.json").read_text())
    assert meta["config"]["training"]["micro_batches"] == 2
    capsys.readouterr()
    assert main(["status", "--store", str(store)]) == 0
    assert "batch 32 in 2 micro-batches" in capsys.readouterr().out
