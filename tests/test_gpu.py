"""Exactness on CUDA: a shard trained on a GPU, retrained after a deletion, is bit for bit the
fresh fit of the reduced data, in process and in Ray workers that each hold a GPU share.

Skipped on machines without CUDA (CI has none); run them on a GPU node with
``python -m pytest -m gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_exactness import assert_exact

from sisa_ray.core.config import ResourceConfig, ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.core.runtime import pinned_env
from sisa_ray.ensemble import SISAEnsemble

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def cuda_config():
    # a CNN: convolutions go through cuDNN, whose default algorithms are not deterministic
    return SISAConfig(
        sharding=ShardingConfig(n_shards=3, n_slices=3, seed=5),
        training=TrainingConfig(model="cnn", epochs=2, batch_size=16, device="cuda"),
    )


def test_cuda_pins_deterministic_cublas():
    env = pinned_env(TrainingConfig(model="mlp", device="cuda"))
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_unlearn_on_cuda_in_process_is_exact(tiny, cuda_config, tmp_path):
    train, test = tiny
    ens = SISAEnsemble(cuda_config, store=str(tmp_path / "s"), backend="local").fit(train, test)
    victims = [int(train.ids[7]), int(train.ids[150])]
    rep = ens.unlearn(victims)
    assert rep.shards, "the victims' shards were retrained"
    assert_exact(ens, cuda_config, train, test, victims, tmp_path)


def test_unlearn_in_gpu_workers_matches_in_process_fit(tiny, cuda_config, tmp_path, ray_session):
    """Ray workers holding half a GPU each retrain exactly what a local CUDA fit produces."""
    train, test = tiny
    res = ResourceConfig(num_cpus=0.0, num_gpus=0.5)
    ens = SISAEnsemble(cuda_config, store=str(tmp_path / "r"), backend="ray",
                       resources=res).fit(train, test)
    victims = [int(train.ids[3])]
    ens.unlearn(victims)
    fresh = SISAEnsemble(cuda_config, store=str(tmp_path / "f"), backend="local").fit(
        train.without_ids(np.asarray(victims)))
    from sisa_ray.core.checkpoint import states_identical

    for s, (a, b) in enumerate(zip(ens.shard_states(all_steps=True),
                                   fresh.shard_states(all_steps=True))):
        for step, (x, y) in enumerate(zip(a, b)):
            assert states_identical(x, y) == [], f"shard {s} step {step} differs"
    np.testing.assert_array_equal(ens.predict(test.features), fresh.predict(test.features))
    ens.close()

