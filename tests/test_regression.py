"""Regression beside classification: the SISA path on scikit-learn's diabetes data."""

from __future__ import annotations

import numpy as np
import pytest
from test_exactness import assert_exact

from sisa_ray.core.aggregation import aggregate_regression
from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.core.data import SampleSet
from sisa_ray.datasets import load_diabetes, read_parquet, write_parquet
from sisa_ray.ensemble import SISAEnsemble

CONFIG = SISAConfig(sharding=ShardingConfig(n_shards=3, n_slices=2, seed=5),
                    training=TrainingConfig(epochs=4, batch_size=16, hidden=32, lr=1e-2))


@pytest.fixture(scope="module")
def diabetes():
    return load_diabetes()


def test_mean_and_median_aggregation_by_hand():
    out = np.array([[[1.0], [10.0]], [[2.0], [20.0]], [[6.0], [90.0]]])
    np.testing.assert_allclose(aggregate_regression(out), [3.0, 40.0])
    np.testing.assert_allclose(aggregate_regression(out, how="median"), [2.0, 20.0])
    active = np.array([True, True, False])
    np.testing.assert_allclose(aggregate_regression(out, active), [1.5, 15.0])
    with pytest.raises(ValueError, match="'mean', 'median'"):
        aggregate_regression(out, how="mode")


def test_regression_labels_are_validated():
    with pytest.raises(ValueError, match="NaN or infinity"):
        SampleSet(ids=[1, 2], features=np.zeros((2, 3)), labels=[1.0, np.nan], n_classes=1,
                  task="regression")
    with pytest.raises(ValueError, match="'n_classes' must be 1"):
        SampleSet(ids=[1, 2], features=np.zeros((2, 3)), labels=[1.0, 2.0], n_classes=2,
                  task="regression")


@pytest.mark.parametrize("victims", [[0], [0, 5, 17, 40, 99, 120]])
def test_regression_deletion_is_exact(diabetes, tmp_path, victims):
    train, test = diabetes
    ens = SISAEnsemble(CONFIG, store=str(tmp_path / "s"), backend="local").fit(train, test)
    ids = train.ids[victims].tolist()
    before = ens.score(test)
    rep = ens.unlearn(ids)
    assert rep.deleted == sorted(ids)
    assert_exact(ens, CONFIG, train, test, ids, tmp_path)
    assert ens.verify().identical
    assert 0 < ens.score(test) < 2 * before  # MAE stays sane
    med = ens.predict(test.features, vote="median")
    assert med.shape == (len(test),) and not np.allclose(med, ens.predict(test.features))
    with pytest.raises(ValueError, match="Use predict"):
        ens.predict_proba(test.features)


def test_parquet_float_label_is_regression(diabetes, tmp_path):
    train, _ = diabetes
    write_parquet(train, str(tmp_path / "d.parquet"))
    back = read_parquet(str(tmp_path / "d.parquet"))
    assert back.task == "regression" and back.n_classes == 1
    np.testing.assert_allclose(back.labels, train.labels)


def test_utility_and_forgetting_scores_by_hand():
    import math

    from approx.metrics import forgetting_score, utility_score

    assert utility_score(4.0, 5.0) == 0.8
    err_gold, err_model = np.array([1.0, 10.0, 0.0]), np.array([1.0, 25.0, 30.0])
    expected = (1 + math.exp(-15 / 15) + math.exp(-30 / 15)) / 3
    assert forgetting_score(err_gold, err_model) == pytest.approx(expected)
    assert forgetting_score(err_gold, err_model, alpha=30) == pytest.approx(
        (1 + math.exp(-0.5) + math.exp(-1)) / 3)


@pytest.mark.parametrize("name", ["finetune", "random_labels"])
def test_methods_that_support_regression(diabetes, name):
    import dataclasses

    import torch

    from approx import RandomForget, UnlearningData, get_method, run_method, split_forget
    from approx.loop import RETAIN, LoopConfig, cross_entropy, stack, train
    from approx.metrics import mae, regression_scores
    from sisa_ray.models import build_model

    tr, te = diabetes
    model = build_model("mlp", tr.input_shape, 1, hidden=32, seed=0)
    x, y, r = stack((tr, RETAIN))
    train(model, x, y, r, cross_entropy, LoopConfig(epochs=200, lr=1e-2, optimizer="adam",
                                                    weight_decay=0.0), torch.device("cpu"), 0)
    forget, retain = split_forget(tr, RandomForget(fraction=0.1), seed=0)
    data = UnlearningData(forget=forget, retain=retain, request=RandomForget(fraction=0.1))
    cfg = dataclasses.replace(get_method(name).default_config(), epochs=5, lr=1e-3,
                              optimizer="adam", weight_decay=0.0)
    res = run_method(name, model, data, cfg, seed=0)
    again = run_method(name, model, data, cfg, seed=0)
    from sisa_ray.core.checkpoint import states_identical

    assert states_identical(res.model.state_dict(), again.model.state_dict()) == []
    assert mae(res.model, te) < 2 * mae(model, te)
    scores = regression_scores(res.model, model, forget, te)
    assert 0 < scores["utility"] and 0 < scores["forgetting"] <= 1
    assert scores["combined"] == pytest.approx(scores["utility"] * scores["forgetting"])


def test_classification_only_methods_refuse_regression(diabetes):
    from approx import RandomForget, UnlearningData, run_method, split_forget
    from sisa_ray.models import build_model

    tr, _ = diabetes
    forget, retain = split_forget(tr, RandomForget(fraction=0.1), seed=0)
    data = UnlearningData(forget=forget, retain=retain, request=RandomForget(fraction=0.1))
    with pytest.raises(ValueError, match="does not support regression"):
        run_method("ssd", build_model("mlp", tr.input_shape, 1, hidden=8), data)
