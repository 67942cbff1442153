"""Shared fixtures: tiny digits data, a tiny config, one Ray instance for the whole session."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Every Ray process of the suite (the session instance, test clusters, driver subprocesses) must
# agree on the auth mode; token auth buys nothing on a test machine.
os.environ["RAY_AUTH_MODE"] = "disabled"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    from sisa_ray.datasets import load_digits

    return load_digits()


@pytest.fixture(scope="session")
def tiny(digits):
    """300 training and 100 test digits."""
    train, test = digits
    return train.take(np.arange(300)), test.take(np.arange(100))


@pytest.fixture(scope="session")
def tiny_config():
    return SISAConfig(
        sharding=ShardingConfig(n_shards=4, n_slices=3, seed=11),
        training=TrainingConfig(model="mlp", epochs=3, batch_size=16, hidden=32),
    )


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the suite (ray.init costs seconds)."""
    import ray

    if not ray.is_initialized():
        # address="local": a fresh instance even while a test cluster from `ray start` runs
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
