import dataclasses

import pytest

from sisa_ray.core.config import ResourceConfig, ShardingConfig, SISAConfig, TrainingConfig


def test_error_names_parameter_allowed_and_received():
    msg = r"'n_shards' parameter of ShardingConfig must be an int >= 1\. Got 0 instead"
    with pytest.raises(ValueError, match=msg):
        ShardingConfig(n_shards=0)
    models = r"\['mlp', 'cnn', 'wide_cnn', 'resnet18'\]"
    with pytest.raises(ValueError, match=r"'model' parameter .* one of " + models):
        TrainingConfig(model="vgg")
    with pytest.raises(ValueError, match="'lr'"):
        TrainingConfig(lr=0)
    with pytest.raises(ValueError, match="'n_slices'"):
        ShardingConfig(n_slices=True)
    with pytest.raises(ValueError, match="'num_cpus'"):
        ResourceConfig(num_cpus=-1)


def test_configs_are_frozen_and_keyword_only():
    cfg = ShardingConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_shards = 3
    with pytest.raises(TypeError):
        ShardingConfig(4, 2)


def test_from_dict_round_trip_and_rejects_typos():
    cfg = SISAConfig(sharding=ShardingConfig(n_shards=3), training=TrainingConfig(epochs=2))
    assert SISAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['epoch'\] for TrainingConfig"):
        TrainingConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="Unknown key"):
        SISAConfig.from_dict({"shardin": {}})


def test_config_hash_tracks_every_field():
    a = SISAConfig()
    assert a.config_hash() == SISAConfig().config_hash()
    assert a.config_hash() != SISAConfig(training=TrainingConfig(lr=2e-3)).config_hash()
    assert a.config_hash() != SISAConfig(sharding=ShardingConfig(seed=1)).config_hash()
