"""``sisa-ray compare``: the approximate methods as trials of ONE parallel Ray Tune experiment,
against the exact SISA deletion and the naive retrain, logged to MLflow while it runs.

1. Load the data, hold out ``extra_fraction`` of the training split as extra data (Twin MU's twin
   problem; it is never trained on), and select the forget set.
2. Train, per seed and in parallel as Ray tasks: the original and gold models (monolith: a model on
   all data and one on the retain set; sisa: an ensemble and its exact deletion) and, always, a SISA
   ensemble with its exact deletion and a from-scratch ensemble retrain (for the timing rows).
   The trained problem goes to the object store once and is shared by every trial.
3. One Tune experiment searches every method at once: the method is the first dimension of the
   space (:func:`tune.spaces.experiment_space`), each method with its own conditional space, on
   seed 0, minimising the alignment score (:mod:`tune.objective`). Trials run in parallel up to
   the cluster's CPUs (or GPUs); a method that trains reports once per epoch and an ASHA
   scheduler per method stops its hopeless configurations early.
4. The best completed config of each method is re-run on every seed as Ray tasks (its own
   original, against that seed's gold): mean and spread, and the NeurIPS 2023 challenge's
   forgetting quality F over the seeds' models.
5. The table (methods, exact path, naive retrain) and plots go to ``out`` and to the MLflow
   parent run; every trial reached MLflow as a child run while the experiment ran.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from approx import get_method, parse_request, split_forget
from approx.metrics import challenge_score, forgetting_quality
from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig

from .config import PRESETS, CompareConfig
from .objective import alignment
from .problem import ModelSpec, Problem, apply_method, forget_margins, score, train_seed

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "CompareConfig", "run_comparison"]

def device_for(gpus: float) -> str:
    """Trials asked for a GPU share run on CUDA; everything else on the CPU."""
    return "cuda" if gpus > 0 else "cpu"


def _trial(config: dict, problem: Problem = None, device: str = "cpu", threads: int = 1) -> None:
    """One Tune trial: unlearn seed 0's original with the trial's method and parameters, and
    report the scores against seed 0's gold (a method that trains reports once per epoch)."""
    import torch

    from .ray_compat import report
    from .spaces import config_from, trial_point

    torch.set_num_threads(threads)
    method, params = trial_point(config)

    def per_epoch(model, epoch: int) -> None:
        metrics = score(problem, model, float("nan")).to_dict()
        report({**metrics, "alignment": alignment(metrics), "epoch": epoch, "complete": 0.0})

    model, seconds = apply_method(problem, method, config_from(method, params), seed=0,
                                  device=device, epoch_end=per_epoch, threads=threads)
    metrics = score(problem, model, seconds).to_dict()
    report({**metrics, "alignment": alignment(metrics), "complete": 1.0})


def _rerun(problem: Problem, method: str, params: dict, seed_index: int, device: str,
           threads: int = 1) -> dict:
    """The best config of ``method`` on seed ``seed_index`` (a Ray task)."""
    import torch

    from .spaces import config_from

    torch.set_num_threads(threads)
    model, seconds = apply_method(problem, method, config_from(method, params), seed=seed_index,
                                  seed_index=seed_index, device=device, threads=threads)
    metrics = score(problem, model, seconds, seed_index).to_dict()
    metrics["alignment"] = alignment(metrics)
    metrics["margins"] = forget_margins(problem, model)
    return metrics


def _reference_seed(problem: Problem, seed_index: int) -> dict:
    """Scores of one seed's original, exact deletion and naive retrain, and its gold's (a Ray
    task)."""
    import torch

    from approx.metrics import evaluate

    torch.set_num_threads(1)
    t = problem.seeds[seed_index]
    gold = problem.model(t.gold)
    g = evaluate(gold, problem.forget, problem.retain, problem.test,
                 seconds=t.retrain_seconds, seed=seed_index)
    out = {"gold": g.to_dict(), "gold_margins": forget_margins(problem, gold)}
    for name, states, seconds in (("original", t.original, 0.0),
                                  ("exact", t.exact, t.exact_seconds),
                                  ("retrain", t.gold if t.retrain is None else t.retrain,
                                   t.retrain_seconds)):
        model = problem.model(states)
        m = score(problem, model, seconds, seed_index, gold_eval=g).to_dict()
        m["alignment"] = alignment(m)
        m["margins"] = forget_margins(problem, model)
        out[name] = m
    return out


def mean_spread(values: list) -> tuple[float, float]:
    """Mean and sample standard deviation of the defined values; the spread of fewer than two
    values is undefined (NaN, written as null), never 0."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")


def forgetting_quality_spread(unlearned: np.ndarray, retrained: np.ndarray) -> tuple[float, float]:
    """F over all forget examples, and its standard error over the examples.

    F is a mean over forget examples of per-example points (each from that example's
    statistic under the ``M`` unlearned and ``M`` retrained models), so its spread is the
    standard error of that mean: ``std(points, ddof=1) / sqrt(n_examples)``.
    """
    f = forgetting_quality(unlearned, retrained)
    n = unlearned.shape[1]
    if n < 2:
        return f, float("nan")
    points = [forgetting_quality(unlearned[:, [j]], retrained[:, [j]]) for j in range(n)]
    return f, float(np.std(points, ddof=1) / math.sqrt(n))


def summarise(name: str, kind: str, per_seed: list[dict], best: dict | None,
              gold_margins: list[np.ndarray], gold_rows: list[dict]) -> dict:
    """One table row: every number the seeds measured (every field of
    :class:`approx.metrics.Evaluation`, the alignment) as mean and ``<name>_std`` spread over
    seeds, F with its standard error when 2 or more seeds ran, and the challenge's score.
    ``best`` is an approximate method's chosen config (``{}``: its defaults), None for the
    reference rows."""
    row: dict = {"method": name, "kind": kind, "seeds": len(per_seed)}
    keys = sorted({k for r in per_seed for k, v in r.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for key in keys:
        row[key], row[f"{key}_std"] = mean_spread([r.get(key) for r in per_seed])
    f = f_se = float("nan")
    if len(per_seed) >= 2:
        f, f_se = forgetting_quality_spread(np.stack([r["margins"] for r in per_seed]),
                                            np.stack(gold_margins))
    row["forgetting_quality"], row["forgetting_quality_std"] = f, f_se
    ra_g, _ = mean_spread([r.get("retain_acc") for r in gold_rows])
    ta_g, _ = mean_spread([r.get("test_acc") for r in gold_rows])
    row["score"] = challenge_score(f, row.get("retain_acc", math.nan), ra_g,
                                   row.get("test_acc", math.nan), ta_g) \
        if not math.isnan(f) else float("nan")
    row["best_config"] = best
    return row


def every_tenth(total: int, label: str, say: Callable[[str], None],
                clock: Callable[[], float] = time.perf_counter) -> Callable[[int], None]:
    """A progress line ``[compare] label: n/total (elapsed, about ETA left)`` at the 10%, 20%, ...
    marks of ``total`` and at the end, not for every one of hundreds of tasks. The ETA assumes
    the remaining items take as long on average as the finished ones."""
    step, start = max(1, total // 10), clock()

    def tell(n: int) -> None:
        if n != total and n % step:
            return
        elapsed = clock() - start
        left = "" if n == total else f", about {elapsed / max(n, 1) * (total - n):.0f}s left"
        say(f"[compare] {label}: {n}/{total} ({elapsed:.0f}s elapsed{left})")

    return tell


#: ``counter(label, total)`` returns ``tell(n)``, called as ``n`` of ``total`` items finish
Counter = Callable[[str, int], Callable[[int], None]]


def lines_counter(say: Callable[[str], None]) -> Counter:
    """The default counter: a line at every tenth (see :func:`every_tenth`); a terminal gets a
    progress bar from the CLI instead."""
    return lambda label, total: every_tenth(total, label, say)


class TrialProgress:
    """The observer of the Tune experiment: tells MLflow (``tracker``) of every trial as it
    starts, reports and ends, and counts finished trials in a progress line."""

    def __init__(self, tracker, total: int, say: Callable[[str], None],
                 counter: Counter | None = None) -> None:
        self._tracker, self._n = tracker, 0
        self._tell = (counter or lines_counter(say))("Tune trials ended", total)

    def trial_started(self, trial_id: str, config: dict) -> None:
        self._tracker.trial_started(trial_id, config)

    def trial_result(self, trial_id: str, metrics: dict, step: int) -> None:
        self._tracker.trial_result(trial_id, metrics, step)

    def trial_finished(self, trial_id: str, error: str | None) -> None:
        self._tracker.trial_finished(trial_id, error)
        self._n += 1
        self._tell(self._n)


def best_configs(results: list[dict], methods: list[str],
                 say: Callable[[str], None] = lambda m: None) -> tuple[list[dict], dict]:
    """Each method's best config: the lowest alignment among its trials that ran to the end.

    A trial ASHA stopped early last reported a model trained for fewer epochs than its config
    says, so its alignment does not describe the config, and an errored trial has none. Returns
    ``(trials, {method: params})``: one record per trial, with the method's own parameters.
    """
    from .spaces import trial_point

    trials: list[dict] = []
    best: dict[str, dict] = {}
    for name in methods:
        mine = [r for r in results if trial_point(r["config"])[0] == name]
        for i, r in enumerate(mine):
            trials.append({"method": name, "index": i, **r, "config": trial_point(r["config"])[1]})
        done = [r for r in mine if r["error"] is None and r["metrics"].get("complete") == 1.0]
        if not done:
            say(f"[compare] {name}: no trial completed: "
                f"{next((r['error'] for r in mine if r['error']), 'stopped early')}")
            continue
        top = min(done, key=lambda r: r["metrics"]["alignment"])
        best[name] = trial_point(top["config"])[1]
        stopped = sum(1 for r in mine if r["error"] is None and r not in done)
        say(f"[compare] {name}: {len(mine)} trial(s), {stopped} stopped early, best alignment "
            f"{top['metrics']['alignment']:.4f} with {best[name] or 'defaults'}")
    return trials, best


def _run_tasks(submit: list[Callable], limit: int | None, done: Callable[[int], None]) -> list:
    """Ray tasks with at most ``limit`` in flight (``submit[i]()`` starts one and returns its
    ref); results in submission order; ``done(n)`` after each completion."""
    import ray

    results: dict = {}
    pending: dict = {}
    queue = list(enumerate(submit))
    while queue or pending:
        while queue and (limit is None or len(pending) < limit):
            i, start = queue.pop(0)
            pending[start()] = i
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            results[pending.pop(ref)] = ray.get(ref)
        done(len(results))
    return [results[i] for i in range(len(submit))]


def run_comparison(cfg: CompareConfig, say: Callable[[str], None] = print,
                   verbose: bool = False, counter: Counter | None = None) -> dict:
    """Run a whole comparison; return ``{"rows", "trials", "mlflow", "out"}``.

    ``say`` receives one progress line at a time. Unless ``verbose``, what Ray and Tune print
    goes to ``<out>/ray-output.log`` instead of the terminal (see
    :func:`tune.ray_compat.quiet_ray`); with it, Tune prints its own progress too.
    """
    from sisa_ray.datasets import load_dataset
    from sisa_ray.executor import ensure_ray

    from .ray_compat import quiet_ray
    from .report import figures, write_plots, write_table
    from .spaces import trial_point
    from .tracking import ComparisonRun, tracking_uri

    started = time.perf_counter()
    request = parse_request(cfg.forget)
    train_all, test = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download)
    methods = cfg.method_names(train_all.task, request.kind)
    for name in methods:
        if train_all.task not in get_method(name).tasks:
            raise ValueError(f"Method {name!r} does not support {train_all.task} (it supports "
                             f"{list(get_method(name).tasks)}); leave it out of --methods.")
        if request.kind not in get_method(name).kinds:
            raise ValueError(f"Method {name!r} does not support {request.kind!r} requests "
                             f"(it supports {list(get_method(name).kinds)}); leave it out of "
                             "--methods.")
    rng = np.random.default_rng(cfg.seed)
    if cfg.max_train is not None and cfg.max_train < len(train_all):
        train_all = train_all.select_ids(rng.choice(train_all.ids, cfg.max_train, replace=False))
    extra_ids = rng.choice(train_all.ids, size=max(2, int(cfg.extra_fraction * len(train_all))),
                           replace=False)
    train_set, extra = train_all.without_ids(extra_ids), train_all.select_ids(extra_ids)
    forget, retain = split_forget(train_set, request, cfg.seed)
    spec = ModelSpec(cfg.model, train_set.input_shape, train_set.n_classes, cfg.hidden)
    sisa = SISAConfig(
        sharding=ShardingConfig(n_shards=cfg.shards, n_slices=cfg.slices, seed=0),
        training=TrainingConfig(model=cfg.model, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                lr=cfg.lr, hidden=cfg.hidden),
    )
    problem = Problem(cfg.target, spec, request, forget, retain, test, extra, sisa)
    out = Path(cfg.out or tempfile.mkdtemp(prefix="sisa-compare-")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    uri = tracking_uri(cfg.mlflow_uri)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    mlrun = ComparisonRun(
        uri=uri, experiment=cfg.experiment,
        run_name=f"{cfg.dataset}-{request}-{cfg.target}-{stamp}",
        params=cfg.params(methods, out), tags={"sisa_ray.target": cfg.target},
    )
    mlrun.describe_trials(trial_point)
    say(f"[compare] {cfg.dataset}: {len(train_set)} train, {len(forget)} to forget ({request}), "
        f"{len(test)} test, {len(extra)} extra; target {cfg.target}; {cfg.seeds} seed(s); "
        f"MLflow parent run {mlrun.parent_run_id} ({uri})")
    try:
        with quiet_ray(out / "ray-output.log", verbose):
            ensure_ray(cfg.address)
            result = _compare(cfg, problem, train_set, methods, out, mlrun, say, verbose,
                              counter or lines_counter(say))
        table = result["rows"]
        files = write_table(table, out)
        figs = figures(table)
        files += write_plots(table, out, figs)
        _log_references(mlrun, cfg, table)
        mlrun.finish(table=table, figures=figs, files=files, metrics={
            **{f"best.{r['method']}.{k}": v for r in table if r["kind"] == "approx"
               for k, v in r.items() if not k.endswith("_std")},
            "comparison_seconds": time.perf_counter() - started,
        })
        _close(figs)
    except BaseException:
        mlrun.fail()
        raise
    say(f"[compare] done in {time.perf_counter() - started:.0f}s; logged to MLflow ({uri}), "
        f"parent run {mlrun.parent_run_id}; table and plots in {out}")
    return {**result, "mlflow": {"uri": uri, "experiment_id": mlrun.experiment_id,
                                 "parent_run_id": mlrun.parent_run_id}, "out": str(out)}


def _close(figs: dict) -> None:
    import matplotlib.pyplot as plt

    for fig in figs.values():
        plt.close(fig)


def _compare(cfg: CompareConfig, problem: Problem, train_set, methods: list[str], out: Path,
             mlrun, say: Callable[[str], None], verbose: bool, counter: Counter) -> dict:
    """Seeds, the one Tune experiment, the reruns and the table (see the module docstring)."""
    import ray

    from .ray_compat import run_experiment
    from .spaces import experiment_space, optuna_space, trial_point

    device = device_for(cfg.gpus_per_trial)
    threads = max(1, int(cfg.cpus_per_trial))
    problem_ref, train_ref = ray.put(problem), ray.put(train_set)
    seed_task = ray.remote(num_cpus=1)(train_seed)
    problem.seeds = _run_tasks(
        [lambda s=s: seed_task.remote(problem_ref, train_ref, s) for s in range(cfg.seeds)],
        cfg.max_concurrent,
        counter("seeds with their models trained", cfg.seeds),
    )
    problem_ref = ray.put(problem)

    task = problem.retain.task
    space = optuna_space(methods, task) if cfg.search == "optuna" else experiment_space(
        methods, task, cfg.search)
    samples = {"random": cfg.num_samples, "grid": 1, "optuna": cfg.num_samples * len(methods)}
    n_trials = len(space["point"]["grid_search"]) if cfg.search == "grid" \
        else cfg.num_samples * len(methods)
    say(f"[compare] one Tune experiment over {len(methods)} method(s): {', '.join(methods)}")
    results = run_experiment(
        _trial, space, search=cfg.search, num_samples=samples[cfg.search], metric="alignment",
        mode="min", name="compare", storage_path=str(out / "tune"), seed=cfg.seed,
        resources={"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial},
        max_concurrent=cfg.max_concurrent, scheduler=cfg.scheduler,
        group=lambda c: trial_point(c)[0],
        observer=TrialProgress(mlrun, n_trials, say, counter),
        verbose=verbose,
        problem=problem, device=device, threads=threads,
    )
    trials, best = best_configs(results, methods, say)

    rerun = ray.remote(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial)(_rerun)
    reference = ray.remote(num_cpus=1)(_reference_seed)
    jobs = [(name, s) for name in best for s in range(cfg.seeds)]
    submit = [lambda n=n, s=s: rerun.remote(problem_ref, n, best[n], s, device, threads) for n, s in jobs]
    submit += [lambda s=s: reference.remote(problem_ref, s) for s in range(cfg.seeds)]
    total = len(submit)
    finished = _run_tasks(submit, cfg.max_concurrent,
                          counter("best configs and references on every seed", total))
    per_method: dict[str, list[dict]] = {name: [] for name in best}
    for (name, _), res in zip(jobs, finished):
        per_method[name].append(res)
    refs = finished[len(jobs):]
    gold_rows = [r["gold"] for r in refs]
    gold_margins = [r["gold_margins"] for r in refs]

    def row(name: str, kind: str, per_seed: list[dict], params: dict | None) -> dict:
        return summarise(name, kind, per_seed, params, gold_margins, gold_rows)

    table = [row("original", "original", [r["original"] for r in refs], None)]
    table += [row(name, "approx", per_method[name], best[name]) for name in methods
              if name in per_method]
    retrain_name = "naive retrain" + (" (ensemble)" if problem.target == "sisa" else "")
    table += [row("exact SISA deletion", "exact", [r["exact"] for r in refs], None),
              row(retrain_name, "retrain", [r["retrain"] for r in refs], None)]
    return {"rows": table, "trials": trials}


def _log_references(mlrun, cfg: CompareConfig, table: list[dict]) -> None:
    """Child runs for the original model, the exact SISA deletion and the naive retrain, with
    the params that made them."""
    training = {"model": cfg.model, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                "lr": cfg.lr, "hidden": cfg.hidden, "seeds": cfg.seeds, "target": cfg.target,
                "dataset": cfg.dataset, "forget": cfg.forget}
    sisa = {"shards": cfg.shards, "slices": cfg.slices}
    for r in table:
        if r["kind"] == "approx":
            continue
        params = {**training, **(sisa if r["kind"] == "exact" or cfg.target == "sisa" else {})}
        mlrun.child(r["method"], tags={"method": r["method"], "kind": r["kind"]}, params=params,
                    metrics={k: v for k, v in r.items() if k != "seeds"})

