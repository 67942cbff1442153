"""The Ray edge: shard actors give the same bits as in-process training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sisa_ray.core.checkpoint import states_identical
from sisa_ray.ensemble import SISAEnsemble
from sisa_ray.executor import RayExecutor

pytestmark = pytest.mark.ray


def test_actors_train_delete_and_match_local_bit_for_bit(ray_session, tiny, tiny_config,
                                                         tmp_path):
    train, test = tiny
    ens = SISAEnsemble(tiny_config, store=str(tmp_path / "ray"), backend="ray").fit(train, test)
    try:
        ex = ens.executor
        assert isinstance(ex, RayExecutor)
        # idle workers (these and any other test's warm ones) reserve only a token share of a
        # CPU each; training is bounded by the CPUs instead
        assert ray_session.available_resources().get("CPU", 0) > 1.9
        assert ex.max_concurrent() == 2
        victims = train.ids[[0, 77, 150]].tolist()
        rep = ens.unlearn(victims)
        assert rep.deleted == sorted(victims)
        local = SISAEnsemble(tiny_config, store=str(tmp_path / "local"), backend="local").fit(
            train.without_ids(np.array(victims)), test
        )
        for s, (a, b) in enumerate(zip(ens.shard_states(True), local.shard_states(True))):
            for x, y in zip(a, b):
                assert states_identical(x, y) == [], f"shard {s}"
        p_ray, _ = ens.shard_proba(test.features)
        p_loc, _ = local.shard_proba(test.features)
        np.testing.assert_array_equal(p_ray, p_loc)
    finally:
        ens.close()


def test_cli_on_ray(ray_session, tmp_path, capsys):
    from sisa_ray.cli import main

    store = str(tmp_path / "s")
    assert main(["train", "--store", store, "--shards", "2", "--slices", "2", "--epochs", "1",
                 "--json"]) == 0
    capsys.readouterr()
    assert main(["delete", "--store", store, "--ids", "0,2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert sorted(rep["deleted"]) == [0, 2]
    assert main(["verify", "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["identical"] is True


def test_one_pool_serves_store_after_store_without_restarting(ray_session, tiny, tiny_config,
                                                              tmp_path):
    """A driver's own pool moves its workers to the next store (torch stays loaded in them):
    start-up is paid once, and the second store's shards are still the bits of a local fit."""
    train, test = tiny
    pool = RayExecutor()
    try:
        first = SISAEnsemble(tiny_config, store=str(tmp_path / "a"), backend="ray",
                             executor=pool).fit(train, test)
        actors = {i: w._actor_id.hex() for i, w in pool._workers.items()}
        started = pool.startup_seconds
        other = train.without_ids(train.ids[:20])
        second = SISAEnsemble(tiny_config, store=str(tmp_path / "b"), backend="ray",
                              executor=pool).fit(other, test)
        assert {i: w._actor_id.hex() for i, w in pool._workers.items()} == actors
        assert pool.startup_seconds == started
        local = SISAEnsemble(tiny_config, store=str(tmp_path / "l"), backend="local").fit(other)
        for s, (a, b) in enumerate(zip(second.shard_states(True), local.shard_states(True))):
            for x, y in zip(a, b):
                assert states_identical(x, y) == [], f"shard {s}"
        # the first store is served again by the same workers, from its own checkpoints
        np.testing.assert_array_equal(first.predict(test.features),
                                      SISAEnsemble.open(str(tmp_path / "a"), backend="local")
                                      .predict(test.features))
    finally:
        pool.shutdown()
