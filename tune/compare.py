"""``sisa-ray compare``: the approximate methods as parallel Ray Tune trials, against the exact SISA
deletion and the naive retrain, logged to MLflow.

1. Load the data, hold out ``extra_fraction`` of the training split as extra data (Twin MU's twin
   problem; it is never trained on), and select the forget set.
2. Train, per seed and in parallel as Ray tasks: the original and gold models (monolith: a model on
   all data and one on the retain set; sisa: an ensemble and its exact deletion) and, always, a SISA
   ensemble with its exact deletion and a from-scratch ensemble retrain (for the timing rows).
   The trained problem goes to the object store once and is shared by every trial.
3. For each method, a Tuner searches its space (:mod:`tune.spaces`) on seed 0, minimising the
   alignment score (:mod:`tune.objective`); trials run in parallel up to the cluster's CPUs.
4. The best config of each method is re-run on every seed (its own original, against that seed's
   gold): mean and spread, and the challenge's forgetting quality when 2 or more seeds ran.
5. The table (methods, exact path, naive retrain) and plots go to ``out`` and to MLflow.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from approx import get_method, list_methods, parse_request, split_forget
from approx.metrics import challenge_score, forgetting_quality
from sisa_ray.core.config import (
    ShardingConfig,
    SISAConfig,
    TrainingConfig,
    check_choice,
    check_int,
)

from .objective import alignment
from .problem import TARGETS, ModelSpec, Problem, apply_method, forget_margins, score, train_seed
from .spaces import config_from, space_for

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    forget: str = "random:0.1"
    methods: tuple[str, ...] = ("all",)
    target: str = "monolith"
    model: str = "mlp"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    hidden: int = 128
    shards: int = 4
    slices: int = 2
    num_samples: int = 4
    search: str = "random"
    seeds: int = 3
    extra_fraction: float = 0.1
    max_train: int | None = None
    seed: int = 0
    mlflow_uri: str | None = None
    experiment: str = "sisa-ray-compare"
    address: str | None = None
    max_concurrent: int | None = None
    out: str | None = None

    def __post_init__(self) -> None:
        check_choice("CompareConfig", "target", self.target, TARGETS)
        check_choice("CompareConfig", "search", self.search, ("random", "grid", "optuna"))
        for name in ("num_samples", "seeds", "epochs", "shards", "slices"):
            check_int("CompareConfig", name, getattr(self, name), 1)
        if not 0 < self.extra_fraction < 1:
            raise ValueError("The 'extra_fraction' parameter must be in (0, 1). "
                             f"Got {self.extra_fraction!r} instead.")
        parse_request(self.forget)  # fail early on a malformed request
        self.method_names()

    def method_names(self, task: str = "classification", kind: str | None = None) -> list[str]:
        """The methods to compare; ``all`` means every method that supports the task and the
        request kind."""
        if tuple(self.methods) == ("all",):
            return [m for m in list_methods() if task in get_method(m).tasks
                    and (kind is None or kind in get_method(m).kinds)]
        for m in self.methods:
            get_method(m)
        return list(self.methods)


def _mean_std(rows: list[dict], key: str) -> tuple[float, float]:
    vals = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.std(vals))


def _trial(config: dict, problem: Problem = None, method: str = "") -> None:
    import torch

    from .ray_compat import report

    torch.set_num_threads(1)
    model, seconds = apply_method(problem, method, config_from(method, config), seed=0)
    metrics = score(problem, model, seconds).to_dict()
    metrics["alignment"] = alignment(metrics)
    report(metrics)


def _rerun(problem: Problem, method: str, params: dict, seed_index: int) -> dict:
    import torch

    torch.set_num_threads(1)
    cfg = config_from(method, params)
    model, seconds = apply_method(problem, method, cfg, seed=seed_index, seed_index=seed_index)
    metrics = score(problem, model, seconds, seed_index).to_dict()
    metrics["alignment"] = alignment(metrics)
    metrics["margins"] = forget_margins(problem, model)
    return metrics


def _summarise(name: str, kind: str, per_seed: list[dict], best: dict | None,
               gold_margins: list[np.ndarray], gold_rows: list[dict]) -> dict:
    row = {"method": name, "kind": kind, "seeds": len(per_seed), "best_config": best or {}}
    for key in ("forget_acc", "retain_acc", "test_acc", "forget_gap", "retain_gap", "test_gap",
                "mia", "mia_gap", "activation_distance", "js_divergence", "alignment", "seconds",
                "time_ratio", "forget_mae", "retain_mae", "test_mae", "utility", "forgetting",
                "combined"):
        row[key], std = _mean_std(per_seed, key)
        if key in ("alignment", "forget_acc"):
            row[f"{key}_std"] = std
    f = float("nan")
    if len(per_seed) >= 2:
        f = forgetting_quality(np.stack([r["margins"] for r in per_seed]), np.stack(gold_margins))
    row["forgetting_quality"] = f
    ra_g, _ = _mean_std(gold_rows, "retain_acc")
    ta_g, _ = _mean_std(gold_rows, "test_acc")
    row["score"] = challenge_score(f, row["retain_acc"], ra_g, row["test_acc"], ta_g) \
        if not math.isnan(f) else float("nan")
    return row


def run_comparison(cfg: CompareConfig, say: Callable[[str], None] = print) -> dict:
    """Run a whole comparison; return ``{"rows", "trials", "mlflow", "out"}``."""
    import ray

    from sisa_ray.datasets import load_dataset
    from sisa_ray.executor import ensure_ray

    from .ray_compat import run_trials
    from .report import write_plots, write_table
    from .tracking import default_tracking_uri, log_comparison

    request = parse_request(cfg.forget)
    ensure_ray(cfg.address)

    train_all, test = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download)
    methods = cfg.method_names(train_all.task, request.kind)
    rng = np.random.default_rng(cfg.seed)
    if cfg.max_train is not None and cfg.max_train < len(train_all):
        train_all = train_all.select_ids(rng.choice(train_all.ids, cfg.max_train, replace=False))
    extra_ids = rng.choice(train_all.ids, size=max(2, int(cfg.extra_fraction * len(train_all))),
                           replace=False)
    train_set, extra = train_all.without_ids(extra_ids), train_all.select_ids(extra_ids)
    forget, retain = split_forget(train_set, request, cfg.seed)
    for name in methods:
        if train_all.task not in get_method(name).tasks:
            raise ValueError(f"Method {name!r} does not support {train_all.task} (it supports "
                             f"{list(get_method(name).tasks)}); leave it out of --methods.")
        if request.kind not in get_method(name).kinds:
            raise ValueError(f"Method {name!r} does not support {request.kind!r} requests "
                             f"(it supports {list(get_method(name).kinds)}); leave it out of "
                             "--methods.")
    spec = ModelSpec(cfg.model, train_set.input_shape, train_set.n_classes, cfg.hidden)
    sisa = SISAConfig(
        sharding=ShardingConfig(n_shards=cfg.shards, n_slices=cfg.slices, seed=0),
        training=TrainingConfig(model=cfg.model, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                lr=cfg.lr, hidden=cfg.hidden),
    )
    problem = Problem(cfg.target, spec, request, forget, retain, test, extra, sisa)
    say(f"[compare] {cfg.dataset}: {len(train_set)} train, {len(forget)} to forget ({request}), "
        f"{len(test)} test, {len(extra)} extra; target {cfg.target}; {cfg.seeds} seed(s)")

    task = ray.remote(num_cpus=1)(train_seed)
    problem_ref, train_ref = ray.put(problem), ray.put(train_set)
    problem.seeds = ray.get([task.remote(problem_ref, train_ref, s) for s in range(cfg.seeds)])
    say(f"[compare] original and gold models trained for {cfg.seeds} seed(s)")
    problem_ref = ray.put(problem)

    out = Path(cfg.out or tempfile.mkdtemp(prefix="sisa-compare-")).resolve()
    trials: list[dict] = []
    best: dict[str, dict] = {}
    for name in methods:
        results = run_trials(
            _trial, space_for(name, train_all.task), search=cfg.search, num_samples=cfg.num_samples,
            metric="alignment", mode="min", name=f"{name}", storage_path=str(out / "tune"),
            seed=cfg.seed, max_concurrent=cfg.max_concurrent, problem=problem, method=name,
        )
        ok = [r for r in results if r["error"] is None and "alignment" in r["metrics"]]
        for i, r in enumerate(results):
            trials.append({"method": name, "index": i, **r})
        if not ok:
            say(f"[compare] {name}: every trial failed: {results[0]['error'] if results else ''}")
            continue
        top = min(ok, key=lambda r: r["metrics"]["alignment"])
        best[name] = top["config"]
        say(f"[compare] {name}: {len(results)} trial(s), best alignment "
            f"{top['metrics']['alignment']:.4f} with {top['config'] or 'defaults'}")

    rerun = ray.remote(num_cpus=1)(_rerun)
    pending = {
        name: [rerun.remote(problem_ref, name, params, s) for s in range(cfg.seeds)]
        for name, params in best.items()
    }
    per_method = {name: ray.get(refs) for name, refs in pending.items()}

    rows = _reference_rows(problem)
    gold_rows, gold_margins = rows.pop("_gold_rows"), rows.pop("_gold_margins")
    table = [rows["original"]]
    for name in methods:
        if name in per_method:
            table.append(_summarise(name, "approx", per_method[name], best[name], gold_margins,
                                    gold_rows))
    table += [rows["exact"], rows["retrain"]]

    artifacts = write_table(table, out) + write_plots(table, out)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    uri = cfg.mlflow_uri or default_tracking_uri()
    ids = log_comparison(
        uri=uri, experiment=cfg.experiment, run_name=f"{cfg.dataset}-{request}-{cfg.target}-{stamp}",
        params=dataclasses.asdict(cfg), trials=trials, rows=table, artifacts=artifacts,
    )
    say(f"[compare] logged to MLflow ({uri}), parent run {ids['parent_run_id']}; "
        f"table and plots in {out}")
    return {"rows": table, "trials": trials, "mlflow": {"uri": uri, **ids}, "out": str(out)}


def _reference_rows(problem: Problem) -> dict:
    """Rows for the original model, the exact SISA deletion and the naive retrain."""
    from approx.metrics import evaluate

    gold_rows, gold_margins, originals, exacts, retrains = [], [], [], [], []
    for i, t in enumerate(problem.seeds):
        gold = problem.model(t.gold)
        g = evaluate(gold, problem.forget, problem.retain, problem.test,
                     seconds=t.retrain_seconds, seed=i)
        gold_rows.append(g.to_dict())
        gold_margins.append(forget_margins(problem, gold))
        for model_states, seconds, bucket in (
            (t.original, 0.0, originals),
            (t.exact, t.exact_seconds, exacts),
            (t.gold, t.retrain_seconds, retrains),
        ):
            model = problem.model(model_states)
            m = score(problem, model, seconds, i, gold_eval=g).to_dict()
            m["alignment"] = alignment(m)
            m["margins"] = forget_margins(problem, model)
            bucket.append(m)
    exact_name = "exact SISA deletion"
    retrain_name = "naive retrain" + (" (ensemble)" if problem.target == "sisa" else "")
    return {
        "original": _summarise("original", "original", originals, None, gold_margins, gold_rows),
        "exact": _summarise(exact_name, "exact", exacts, None, gold_margins, gold_rows),
        "retrain": _summarise(retrain_name, "retrain", retrains, None, gold_margins, gold_rows),
        "_gold_rows": gold_rows, "_gold_margins": gold_margins,
    }
