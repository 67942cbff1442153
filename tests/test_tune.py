"""tune/: the objective, the search spaces of the one experiment, the per-method scheduler, the
table and its spreads, MLflow tracking while trials run, the compare command's options, and a
whole tiny comparison on Ray Tune with MLflow in a temporary SQLite store."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from approx import RandomForget, get_method, list_methods, split_forget
from approx.loop import RETAIN, LoopConfig, cross_entropy, on_epoch_end, stack, train
from tune.objective import alignment
from tune.problem import ModelSpec, Problem, apply_method, score, train_seed
from tune.spaces import SPACES, config_from, experiment_space, optuna_space, space_for, trial_point


def test_alignment_hand_values():
    m = {"forget_gap": -0.2, "mia_gap": 0.05, "retain_gap": -0.1, "test_gap": 0.03}
    assert alignment(m) == pytest.approx(0.2 + 0.05 + 0.1 + 0.0)
    m = {"forget_gap": 0.1, "mia_gap": -0.02, "retain_gap": 0.04, "test_gap": -0.07}
    assert alignment(m) == pytest.approx(0.1 + 0.02 + 0.0 + 0.07)
    assert alignment({"forget_gap": 0, "mia_gap": 0, "retain_gap": 0, "test_gap": 0}) == 0
    with pytest.raises(KeyError, match="mia_gap"):
        alignment({"forget_gap": 0, "retain_gap": 0, "test_gap": 0})


# -- search spaces -----------------------------------------------------------------------------


def test_every_method_has_a_valid_space_around_its_defaults():
    from ray.tune.search.sample import Categorical

    assert set(SPACES) == set(list_methods())
    for name in list_methods():
        space = space_for(name)
        defaults = get_method(name).default_config()
        for param, (domain, grid) in space.items():
            cfg = config_from(name, {param: grid[0]})  # grid values build valid configs
            assert getattr(cfg, param) == grid[0]
            if not isinstance(domain, Categorical):
                value = getattr(defaults, param)
                assert domain.lower <= value <= domain.upper, f"{name}.{param} default outside"
            for v in grid:  # the grid lies inside the random space
                if isinstance(domain, Categorical):
                    assert v in domain.categories, f"{name}.{param}={v} not a category"
                else:
                    assert domain.lower <= v <= domain.upper, f"{name}.{param}={v} outside"
    with pytest.raises(ValueError, match="Unknown parameter"):
        config_from("ssd", {"alpah": 3})
    for name in ("finetune", "random_labels"):
        for param, (_, grid) in space_for(name, "regression").items():
            assert getattr(config_from(name, {param: grid[0]}), param) == grid[0]


def test_one_experiment_space_has_the_method_as_a_dimension():
    from ray.tune.search.sample import Domain

    space = experiment_space(["ssd", "finetune"], "classification", "random")
    assert space["method"] == {"grid_search": ["ssd", "finetune"]}
    assert set(space["ssd"]) == {"alpha", "lam"} and set(space["finetune"]) == {"lr", "epochs"}
    assert all(isinstance(d, Domain) for d in space["ssd"].values())
    # a resolved trial reads only its own method's sub-dict
    resolved = {"method": "ssd", "ssd": {"alpha": 3.0, "lam": 0.5}, "finetune": {"lr": 0.1}}
    assert trial_point(resolved) == ("ssd", {"alpha": 3.0, "lam": 0.5})

    grid = experiment_space(["ssd", "finetune"], "classification", "grid")
    points = grid["point"]["grid_search"]
    # ssd: alpha 3 values x lam 2 values; finetune: lr 2 values x epochs 1 value; no cross terms
    assert len(points) == 3 * 2 + 2 * 1
    assert sum(p["method"] == "ssd" for p in points) == 6
    assert {"method": "finetune", "finetune": {"lr": 0.02, "epochs": 5}} in points
    assert trial_point({"point": points[0]}) == ("ssd", {"alpha": 5.0, "lam": 0.5})
    assert trial_point({"method": "fisher_forgetting"}) == ("fisher_forgetting", {})


def test_optuna_space_suggests_only_the_chosen_methods_parameters():
    calls = []

    class Trial:
        def suggest_categorical(self, name, choices):
            calls.append(("cat", name, tuple(choices)))
            return "ssd" if name == "method" else choices[0]

        def suggest_float(self, name, low, high, log=False):
            calls.append(("float", name, low, high, log))
            return low

    optuna_space(["finetune", "ssd"], "classification")(Trial())
    assert calls == [("cat", "method", ("finetune", "ssd")),
                     ("float", "ssd/alpha", 1.0, 100.0, True),
                     ("float", "ssd/lam", 0.1, 1.0, False)]


# -- the scheduler -----------------------------------------------------------------------------


def test_asha_stops_a_trial_only_against_its_own_method():
    """Reward is -alignment. At the first rung (epoch 1) a trial is stopped when its reward is
    below the 50th percentile (reduction factor 2) of the rewards its method recorded there."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from tune.ray_compat import PerMethodASHA

    def trial(tid, method):
        return SimpleNamespace(trial_id=tid, config={"method": method})

    def feed(sched, t, value):
        return sched.on_trial_result(None, t, {"training_iteration": 1, "alignment": value})

    sched = PerMethodASHA(lambda c: c["method"], grace_period=1, reduction_factor=2)
    sched.set_search_properties("alignment", "min")
    a1, b1, a2, a3 = trial("a1", "a"), trial("b1", "b"), trial("a2", "a"), trial("a3", "a")
    for t in (a1, b1, a2, a3):
        sched.on_trial_add(None, t)
    assert feed(sched, a1, 0.1) == TrialScheduler.CONTINUE  # nothing recorded yet
    # b's first trial is far worse than a's, but b has recorded nothing: it goes on
    assert feed(sched, b1, 0.5) == TrialScheduler.CONTINUE
    # a2 is behind a1 (cutoff = -0.1): stopped
    assert feed(sched, a2, 0.5) == TrialScheduler.STOP
    # a3 beats the median of a's rewards [-0.1, -0.5] (-0.3): goes on
    assert feed(sched, a3, 0.2) == TrialScheduler.CONTINUE

    # one ASHA over every trial would have stopped b1 because of a1
    single = ASHAScheduler(metric="alignment", mode="min", grace_period=1, reduction_factor=2,
                           max_t=10**9, stop_last_trials=False)
    for t in (a1, b1):
        single.on_trial_add(None, t)
    assert feed(single, a1, 0.1) == TrialScheduler.CONTINUE
    assert feed(single, b1, 0.5) == TrialScheduler.STOP


def test_tune_bookkeeping_is_not_a_measurement():
    from tune.ray_compat import measurements

    result = {"alignment": 0.2, "forget_acc": 1.0, "pid": 123, "timestamp": 1.7e9,
              "time_this_iter_s": 0.5, "training_iteration": 3, "done": True,
              "trial_id": "x", "date": "today", "time_total_s": 2.0}
    assert measurements(result) == {"alignment": 0.2, "forget_acc": 1.0}


class _Recorder:
    def __init__(self):
        self.events = []

    def trial_started(self, trial_id, config):
        self.events.append(("start", trial_id))

    def trial_result(self, trial_id, metrics, step):
        self.events.append(("result", trial_id, step, set(metrics)))

    def trial_finished(self, trial_id, error):
        self.events.append(("end", trial_id, error))


@pytest.mark.ray
@pytest.mark.parametrize("search", ["grid", "optuna"])
def test_one_experiment_runs_every_method_and_stops_only_within_a_method(ray_session, tmp_path,
                                                                        search):
    """Grid: method a with x = 0.1 and 0.9, method b with x = 0.5. Trials run one at a time
    (max_concurrent=1) in grid order, so at epoch 1 a's 0.9 is behind a's 0.1 and is stopped,
    while b's 0.5, worse than a's best, runs all three epochs. Optuna: the conditional
    space suggests each trial only its own method's parameters."""
    from tune.ray_compat import run_experiment
    from tune.spaces import optuna_space, space_for, trial_point

    def toy(config: dict) -> None:  # nested: shipped to the workers by value
        """Three epochs of a made-up alignment: the trial's ``x`` (grid), else 0.5."""
        import time

        from tune.ray_compat import report
        from tune.spaces import trial_point

        value = float(trial_point(config)[1].get("x", 0.5))
        for epoch in (1, 2, 3):
            time.sleep(0.2)  # an epoch takes time: the stop reaches the trial before its end
            report({"alignment": value, "epoch": epoch, "complete": float(epoch == 3)})

    if search == "grid":
        from ray import tune as ray_tune

        points = [{"method": "a", "a": {"x": 0.1}}, {"method": "a", "a": {"x": 0.9}},
                  {"method": "b", "b": {"x": 0.5}}]
        space, samples = {"point": ray_tune.grid_search(points)}, 1
    else:
        space, samples = optuna_space(["ssd", "finetune"], "classification"), 4
    rec = _Recorder()
    results = run_experiment(
        toy, space, search=search, num_samples=samples, metric="alignment",
        mode="min", name="toy", storage_path=str(tmp_path), seed=0, resources={"cpu": 1},
        max_concurrent=1, group=lambda c: trial_point(c)[0], observer=rec)
    assert len(results) == (3 if search == "grid" else 4)
    assert all(r["error"] is None for r in results)
    for r in results:  # bookkeeping stays out of the measurements
        assert "pid" not in r["metrics"] and "training_iteration" not in r["metrics"]
    starts = [e for e in rec.events if e[0] == "start"]
    ends = [e for e in rec.events if e[0] == "end"]
    assert len(starts) == len(ends) == len(results)  # the observer heard of every trial
    if search == "grid":
        iters = {trial_point(r["config"])[1]["x"]: r["iterations"] for r in results}
        assert iters[0.1] == 3 and iters[0.5] == 3
        assert iters[0.9] < 3  # stopped early (at epoch 1, or the next if Tune had asked for it)
    else:
        for r in results:
            method, params = trial_point(r["config"])
            assert set(params) == set(space_for(method)), (method, params)
            assert set(r["config"]) == {"method", method}  # no other method's draws


# -- the epoch observer the per-epoch reports rely on --------------------------------------------


def test_epoch_observer_sees_every_epoch_and_changes_no_weight(tiny):
    train_set, _ = tiny
    x, y, r = stack((train_set.take(np.arange(64)), RETAIN))
    cfg = LoopConfig(epochs=3, lr=0.01, batch_size=16)

    def fit(hook):
        torch.manual_seed(0)
        # dropout: training mode matters, so an observer that left the model in eval mode
        # would change the weights
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(),
                                    torch.nn.Dropout(0.5), torch.nn.Linear(8, 10))
        with on_epoch_end(hook):
            train(model, x, y, r, cross_entropy, cfg, torch.device("cpu"), seed=0)
        return model

    seen = []

    def hook(model, epoch):
        seen.append((epoch, model.training))
        model(torch.zeros(1, 8, 8))  # a forward pass, as scoring does

    observed, plain = fit(hook), fit(None)
    assert seen == [(1, False), (2, False), (3, False)]
    for a, b in zip(observed.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    fit(None)
    assert len(seen) == 3  # outside the block nothing is observed


def test_best_config_comes_from_trials_that_ran_to_the_end():
    from tune.compare import best_configs

    def result(method, alpha, alignment, complete, error=None):
        return {"config": {"method": method, method: {"alpha": alpha}, "other": {"x": 1}},
                "metrics": {"alignment": alignment, "complete": complete}, "error": error}

    results = [
        result("ssd", 1.0, 0.30, 1.0),
        result("ssd", 2.0, 0.01, 0.0),  # stopped early by ASHA: not a result of its config
        result("ssd", 3.0, 0.20, 1.0),
        result("ssd", 4.0, 0.00, 1.0, error="boom"),
        result("fisher_forgetting", 5.0, 0.9, 0.0),  # every trial stopped: no best
    ]
    said = []
    trials, best = best_configs(results, ["ssd", "fisher_forgetting"], said.append)
    assert best == {"ssd": {"alpha": 3.0}}
    assert [t["config"] for t in trials if t["method"] == "ssd"] == [
        {"alpha": 1.0}, {"alpha": 2.0}, {"alpha": 3.0}, {"alpha": 4.0}]
    assert "1 stopped early" in said[0] and "no trial completed" in said[1]


# -- the table: spreads, F and its standard error, generic columns ------------------------------


def test_spread_of_one_value_is_undefined_not_zero():
    from tune.compare import mean_spread

    assert mean_spread([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std: sqrt(((1)+(0)+(1))/2)
    m, s = mean_spread([5.0])
    assert m == 5.0 and math.isnan(s)
    m, s = mean_spread([4.0, float("nan"), None, 6.0])
    assert (m, s) == (5.0, pytest.approx(math.sqrt(2)))
    assert all(math.isnan(v) for v in mean_spread([]))


def test_forgetting_quality_spread_is_the_standard_error_over_examples(monkeypatch):
    import tune.compare as compare

    # a stand-in F whose per-example points are known: the mean over examples of column means
    monkeypatch.setattr(compare, "forgetting_quality",
                        lambda u, r: float(np.mean(u.mean(axis=0))))
    u = np.array([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])  # points 0, 1, 1, 0
    f, se = compare.forgetting_quality_spread(u, np.zeros_like(u))
    assert f == 0.5
    # std(ddof=1) of [0, 1, 1, 0] = sqrt(1/3); over sqrt(4)
    assert se == pytest.approx(math.sqrt(1 / 3) / 2)


def test_summarise_carries_every_field_with_its_spread_and_F_only_from_two_seeds(monkeypatch):
    import tune.compare as compare

    monkeypatch.setattr(compare, "forgetting_quality", lambda u, r: 0.25)
    seeds = [
        {"forget_acc": 0.5, "retain_acc": 0.9, "test_acc": 0.8, "a_new_metric": 2.0,
         "margins": np.array([1.0, 2.0])},
        {"forget_acc": 0.7, "retain_acc": 0.9, "test_acc": 0.8, "a_new_metric": 4.0,
         "margins": np.array([1.0, 2.0])},
    ]
    gold = [{"retain_acc": 0.9, "test_acc": 0.8}] * 2
    margins = [np.array([0.0, 0.0])] * 2
    row = compare.summarise("m", "approx", seeds, {"alpha": 1.0}, margins, gold)
    assert row["forget_acc"] == pytest.approx(0.6)
    assert row["forget_acc_std"] == pytest.approx(math.sqrt(0.02))
    assert (row["a_new_metric"], row["a_new_metric_std"]) == (3.0, pytest.approx(math.sqrt(2)))
    assert row["forgetting_quality"] == 0.25
    assert row["score"] == pytest.approx(0.25 * (0.9 / 0.9) * (0.8 / 0.8))
    assert row["best_config"] == {"alpha": 1.0} and "margins" not in row

    one = compare.summarise("m", "approx", seeds[:1], None, margins[:1], gold[:1])
    assert math.isnan(one["forgetting_quality"]) and math.isnan(one["score"])
    assert math.isnan(one["forget_acc_std"]) and one["best_config"] is None


def test_markdown_and_csv_show_spreads_and_null_for_undefined(tmp_path):
    from tune.report import columns, to_markdown, write_table

    rows = [
        {"method": "ssd", "kind": "approx", "seeds": 2, "zeta": 1.0, "alignment": 0.25,
         "alignment_std": 0.05, "forgetting_quality": 0.5, "forgetting_quality_std": float("nan"),
         "best_config": {"alpha": 10.0, "lr": 3.2e-05, "epochs": 2}},
        {"method": "original", "kind": "original", "seeds": 1, "zeta": float("nan"),
         "alignment": 0.5, "alignment_std": float("nan"), "forgetting_quality": float("nan"),
         "best_config": None},
    ]
    cols = columns(rows)
    assert cols[:3] == ["method", "kind", "seeds"] and cols[-1] == "best_config"
    assert cols.index("forgetting_quality") < cols.index("zeta")  # headline first, then the rest
    md = to_markdown(rows)
    header, _, ssd, original = md.strip().splitlines()
    assert "alignment_std" not in header and "zeta" in header
    assert "| 0.2500 ± 0.0500 |" in ssd and "| 0.5000 |" in ssd
    assert "alpha=10, lr=3.2e-05, epochs=2" in ssd  # significant digits: a small rate is not 0
    assert "| 0.5000 |" in original and "±" not in original
    write_table(rows, tmp_path)
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert data[0]["forgetting_quality_std"] is None and data[1]["best_config"] is None
    csv_lines = (tmp_path / "comparison.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[:3] == ["method", "kind", "seeds"]


# -- MLflow ------------------------------------------------------------------------------------


def test_tracking_uri_honours_the_environment(monkeypatch, tmp_path):
    from tune.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert tracking_uri(None) == "sqlite:////elsewhere/m.db"
    assert tracking_uri("sqlite:////given.db") == "sqlite:////given.db"


def test_trials_reach_mlflow_as_they_run(tmp_path):
    from mlflow import MlflowClient

    from tune.tracking import ComparisonRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = ComparisonRun(uri=uri, experiment="e", run_name="parent",
                        params={"methods": ("finetune", "ssd"), "out": "/real/out",
                                "data_dir": None, "nested": {"k": 1}})
    run.describe_trials(trial_point)
    client = MlflowClient(uri)
    parent = client.get_run(run.parent_run_id)
    assert parent.data.params == {"methods": "finetune,ssd", "out": "/real/out", "nested.k": "1"}
    assert parent.info.status == "RUNNING"

    config = {"method": "ssd", "ssd": {"alpha": 3.0}, "finetune": {"lr": 0.1}}
    run.trial_started("t1", config)
    run.trial_result("t1", {"alignment": 0.5, "mia": float("nan"), "complete": 0.0}, step=1)
    run.trial_result("t1", {"alignment": 0.25, "complete": 1.0}, step=2)
    child = client.search_runs([run.experiment_id], "tags.trial_id = 't1'")[0]
    # visible while the experiment still runs
    assert child.info.status == "RUNNING"
    assert child.data.tags["mlflow.parentRunId"] == run.parent_run_id
    assert child.data.params == {"method": "ssd", "alpha": "3.0"}  # not finetune's draws
    assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id,
                                                                 "alignment")] == [(1, 0.5),
                                                                                   (2, 0.25)]
    assert set(child.data.metrics) == {"alignment"}  # NaN and the marker are not logged
    run.trial_finished("t1", None)
    run.trial_started("t2", {"method": "finetune", "finetune": {"lr": 0.1}})
    run.trial_finished("t2", "Traceback: boom")
    assert client.get_run(child.info.run_id).info.status == "FINISHED"
    failed = client.search_runs([run.experiment_id], "tags.trial_id = 't2'")[0]
    assert failed.info.status == "FAILED" and "boom" in failed.data.tags["error"]


# -- the problem -------------------------------------------------------------------------------


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


def test_the_naive_retrain_comes_from_seeds_of_its_own(monolith_problem):
    """The retrain row is an independent sample of the retrained distribution (the gold scored
    against itself would give forgetting quality 1 by construction): same data and recipe as
    the gold, another seed."""
    from tune.problem import RETRAIN_SEED_OFFSET, train_monolith

    p = monolith_problem
    t = p.seeds[0]
    again, _ = train_monolith(p.retain, p.spec, p.sisa.training, 0 + RETRAIN_SEED_OFFSET)
    assert all(torch.equal(t.retrain[k], again[k]) for k in again)
    assert not all(torch.equal(t.retrain[k], t.gold[k]) for k in t.gold)


def test_methods_validate_on_held_out_data_never_on_the_test_split(monolith_problem):
    """layer_reset's warm-up learns from the validation split: it must not be the split that
    test_acc is measured on."""
    p = monolith_problem
    val = p.unlearning_data().validation
    assert val is p.extra and len(val)
    assert not set(val.ids.tolist()) & set(p.test.ids.tolist())


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


def test_a_trial_reports_each_epoch_and_the_final_model(monolith_problem, monkeypatch):
    """finetune with 2 epochs: two per-epoch reports, then the final one; the last epoch's
    model is the final model, so their scores agree."""
    import tune.ray_compat as ray_compat
    from tune.compare import _trial

    reports = []
    monkeypatch.setattr(ray_compat, "report", reports.append)
    _trial({"method": "finetune", "finetune": {"epochs": 2}}, problem=monolith_problem)
    assert [(r.get("epoch"), r["complete"]) for r in reports] == [(1, 0.0), (2, 0.0),
                                                                   (None, 1.0)]
    assert reports[1]["forget_acc"] == reports[2]["forget_acc"]
    assert reports[1]["alignment"] == reports[2]["alignment"]
    assert math.isnan(reports[0]["seconds"]) and reports[2]["seconds"] > 0


# -- the command -------------------------------------------------------------------------------


def _compare_args(*argv):
    from sisa_ray.cli import build_parser

    return build_parser().parse_args(["compare", *argv])


def test_compare_offers_no_backend_and_a_preset_the_command_line_overrides(tmp_path, capsys):
    from sisa_ray.cli.compare import config_from_args

    with pytest.raises(SystemExit) as e:
        _compare_args("--backend", "local")
    assert e.value.code == 2 and "--backend" in capsys.readouterr().err
    for flag in ("--cpus-per-shard", "--gpus-per-shard"):
        with pytest.raises(SystemExit):
            _compare_args(flag, "1")

    cfg = config_from_args(_compare_args("--preset", "f32", "--seeds", "2", "--out",
                                         str(tmp_path / "o"), "--gpus-per-trial", "0.5",
                                         "--max-concurrent", "3", "--methods", "ssd,finetune"))
    assert cfg.seeds == 2 and cfg.dataset == "digits" and cfg.epochs == 10  # preset's epochs
    assert cfg.methods == ("ssd", "finetune") and cfg.out == str(tmp_path / "o")
    assert (cfg.gpus_per_trial, cfg.max_concurrent) == (0.5, 3)
    assert config_from_args(_compare_args("--preset", "f32")).seeds >= 32
    plain = config_from_args(_compare_args())
    assert plain.seeds == 3 and plain.out  # a real output directory, never None


# -- whole comparisons -------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_comparison_through_the_cli_logs_to_mlflow(ray_session, tmp_path, monkeypatch,
                                                        capfd):
    from mlflow import MlflowClient

    from sisa_ray.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # honoured without --mlflow-uri
    out = tmp_path / "out"
    code = main(["compare", "--methods", "ssd,finetune", "--target", "sisa", "--epochs", "3",
                 "--shards", "2", "--slices", "2", "--num-samples", "2", "--seeds", "2",
                 "--max-train", "300", "--hidden", "32", "--experiment", "test-compare",
                 "--out", str(out), "--json"])
    assert code == 0
    captured = capfd.readouterr()  # at the file descriptors: Ray and Tune write there too
    result = json.loads(captured.out)  # stdout is strict JSON only
    for noise in ("Wrote the latest version of all result files", "SIGTERM",
                  "worker processes have been started", "Trial status", "Traceback"):
        assert noise not in captured.out + captured.err, noise
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"original", "ssd", "finetune", "exact SISA deletion",
                         "naive retrain (ensemble)"}
    exact = rows["exact SISA deletion"]
    for gap in ("forget_gap", "retain_gap", "test_gap", "mia_gap", "activation_distance",
                "js_divergence", "alignment"):
        assert exact[gap] == 0.0, gap  # with --target sisa the exact deletion is the gold
    assert rows["ssd"]["seeds"] == 2 and rows["ssd"]["forgetting_quality"] is not None
    assert rows["ssd"]["alignment_std"] is not None
    # one experiment, not one per method
    assert [p.name for p in (out / "tune").iterdir() if p.is_dir()] == ["compare"]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("test-compare")
    parent = client.get_run(result["mlflow"]["parent_run_id"])
    assert parent.data.params["target"] == "sisa"
    assert parent.data.params["methods"] == "ssd,finetune"
    assert parent.data.params["out"] == str(out)
    assert "best.ssd.alignment" in parent.data.metrics
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    kinds = sorted(c.data.tags["kind"] for c in children)
    assert kinds == ["approx"] * 4 + ["exact", "original", "retrain"]
    for c in children:  # the parent run spans the whole comparison
        assert parent.info.start_time <= c.info.start_time <= c.info.end_time \
            <= parent.info.end_time
        assert not {"pid", "timestamp", "time_this_iter_s", "training_iteration"} & set(
            c.data.metrics)
        if c.data.tags["kind"] != "approx":
            assert {"epochs", "model", "seeds", "shards", "slices"} <= set(c.data.params)
    trial = next(c for c in children if c.data.tags["method"] == "ssd")
    assert {"alignment", "forget_acc", "mia", "js_divergence", "time_ratio"} <= set(
        trial.data.metrics)
    assert set(trial.data.params) == {"method", "alpha", "lam"}
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.csv", "comparison.md", "comparison_table.json", "alignment_vs_time.png",
            "accuracies.png"} <= names


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


def test_progress_lines_count_and_estimate_the_time_left():
    from tune.compare import every_tenth

    said, now = [], [0.0]
    tell = every_tenth(20, "seeds", said.append, clock=lambda: now[0])
    for n in range(1, 21):
        now[0] = 3.0 * n  # every item takes 3 s
        tell(n)
    assert len(said) == 10  # at 2, 4, ..., 20
    assert said[0] == "[compare] seeds: 2/20 (6s elapsed, about 54s left)"
    assert said[4] == "[compare] seeds: 10/20 (30s elapsed, about 30s left)"
    assert said[-1] == "[compare] seeds: 20/20 (60s elapsed)"
