"""tune/: the objective, the search spaces, the problem, and a whole tiny comparison on Ray Tune
with MLflow in a temporary SQLite store."""

from __future__ import annotations

import math

import numpy as np
import pytest

from approx import RandomForget, get_method, list_methods, split_forget
from tune.objective import alignment
from tune.problem import ModelSpec, Problem, apply_method, score, train_seed
from tune.spaces import SPACES, config_from, space_for


def test_alignment_hand_values():
    m = {"forget_gap": -0.2, "mia_gap": 0.05, "retain_gap": -0.1, "test_gap": 0.03}
    assert alignment(m) == pytest.approx(0.2 + 0.05 + 0.1 + 0.0)
    m = {"forget_gap": 0.1, "mia_gap": -0.02, "retain_gap": 0.04, "test_gap": -0.07}
    assert alignment(m) == pytest.approx(0.1 + 0.02 + 0.0 + 0.07)
    assert alignment({"forget_gap": 0, "mia_gap": 0, "retain_gap": 0, "test_gap": 0}) == 0
    with pytest.raises(KeyError, match="mia_gap"):
        alignment({"forget_gap": 0, "retain_gap": 0, "test_gap": 0})


def test_every_method_has_a_valid_space_around_its_defaults():
    assert set(SPACES) == set(list_methods())
    for name in list_methods():
        space = space_for(name)
        defaults = get_method(name).default_config()
        for param, ((kind, *args), grid) in space.items():
            cfg = config_from(name, {param: grid[0]})  # grid values build valid configs
            assert getattr(cfg, param) == grid[0]
            value = getattr(defaults, param)
            if kind in ("loguniform", "uniform"):
                assert args[0] <= value <= args[1], f"{name}.{param} default outside its space"
    with pytest.raises(ValueError, match="Unknown parameter"):
        config_from("ssd", {"alpah": 3})
    for name in ("finetune", "random_labels"):
        for param, (_, grid) in space_for(name, "regression").items():
            assert getattr(config_from(name, {param: grid[0]}), param) == grid[0]


@pytest.fixture(scope="module")
def monolith_problem(digits):
    from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig

    train, test = digits
    train, test = train.take(np.arange(300)), test.take(np.arange(100))
    forget, retain = split_forget(train, RandomForget(fraction=0.1), seed=0)
    spec = ModelSpec("mlp", train.input_shape, train.n_classes, hidden=32)
    sisa = SISAConfig(sharding=ShardingConfig(n_shards=2, n_slices=2),
                      training=TrainingConfig(epochs=3, hidden=32))
    problem = Problem("monolith", spec, RandomForget(fraction=0.1), forget, retain, test,
                      train.take(np.arange(20)), sisa)
    problem.seeds = [train_seed(problem, train, 0)]
    return problem


def test_gold_scores_zero_gaps_and_methods_are_scored(monolith_problem):
    p = monolith_problem
    gold = p.model(p.seeds[0].gold)
    ev = score(p, gold, 1.0)
    assert (ev.forget_gap, ev.retain_gap, ev.test_gap, ev.mia_gap) == (0, 0, 0, 0)
    assert ev.activation_distance == 0 and ev.js_divergence == 0
    model, seconds = apply_method(p, "finetune", config_from("finetune", {"epochs": 1}), seed=0)
    m = score(p, model, seconds).to_dict()
    assert 0 <= m["forget_acc"] <= 1 and m["time_ratio"] == pytest.approx(
        seconds / p.seeds[0].retrain_seconds)


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_comparison_logs_to_mlflow(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    from tune.compare import CompareConfig, run_comparison

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = CompareConfig(
        dataset="digits", forget="random:0.1", methods=("ssd", "finetune"), target="sisa",
        epochs=3, shards=2, slices=2, num_samples=2, seeds=2, max_train=300, hidden=32,
        mlflow_uri=uri, experiment="test-compare", out=str(tmp_path / "out"),
    )
    result = run_comparison(cfg, say=lambda m: None)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"original", "ssd", "finetune", "exact SISA deletion",
                         "naive retrain (ensemble)"}
    exact = rows["exact SISA deletion"]
    for gap in ("forget_gap", "retain_gap", "test_gap", "mia_gap", "activation_distance",
                "js_divergence", "alignment"):
        assert exact[gap] == 0.0, gap  # with --target sisa the exact deletion is the gold
    assert exact["forgetting_quality"] == 1.0
    assert not math.isnan(rows["ssd"]["forgetting_quality"])
    assert rows["ssd"]["seeds"] == 2

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("test-compare")
    parent = client.get_run(result["mlflow"]["parent_run_id"])
    assert parent.data.params["target"] == "sisa"
    assert "best.ssd.alignment" in parent.data.metrics
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    kinds = sorted(c.data.tags["kind"] for c in children)
    assert kinds == ["approx"] * 4 + ["exact", "original", "retrain"]
    trial = next(c for c in children if c.data.tags["method"] == "ssd")
    assert {"alignment", "forget_acc", "mia", "js_divergence", "time_ratio"} <= set(
        trial.data.metrics)
    assert {"alpha", "lam"} <= set(trial.data.params)
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.csv", "comparison.md", "alignment_vs_time.png", "accuracies.png"} <= names


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_regression_comparison(ray_session, tmp_path):
    from tune.compare import CompareConfig, run_comparison

    cfg = CompareConfig(
        dataset="diabetes", forget="random:0.1", methods=("all",), target="sisa", epochs=20,
        lr=1e-2, shards=2, slices=2, num_samples=1, seeds=2, hidden=32,
        mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", out=str(tmp_path / "out"),
    )
    result = run_comparison(cfg, say=lambda m: None)
    rows = {r["method"]: r for r in result["rows"]}
    # `all` means the methods that support regression
    assert set(rows) == {"original", "finetune", "random_labels", "exact SISA deletion",
                         "naive retrain (ensemble)"}
    exact = rows["exact SISA deletion"]
    assert exact["utility"] == 1.0 and exact["forgetting"] == 1.0 and exact["alignment"] == 0.0
    for r in rows.values():
        assert r["test_mae"] > 0 and math.isnan(r["test_acc"])
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "test_mae" in table and "test_acc" not in table
