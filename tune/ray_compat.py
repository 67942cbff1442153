"""Every fast-moving Ray Tune API the project touches, in one thin module (Ray 2.60).

An upgrade of Ray that renames ``tune.report``, ``RunConfig``, the search algorithms, the
scheduler or the callback hooks is a change to this file only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from ray import tune as ray_tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

log = logging.getLogger(__name__)

SEARCHES = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")

# Tune's own bookkeeping in every result: not a measurement of the method.
BOOKKEEPING = frozenset({
    "pid", "timestamp", "time_this_iter_s", "time_total_s", "time_since_restore",
    "iterations_since_restore", "training_iteration", "done", "date", "hostname", "node_ip",
    "trial_id", "experiment_tag", "checkpoint_dir_name", "should_checkpoint", "config",
})


@contextlib.contextmanager
def quiet_ray(log_path: Path, verbose: bool) -> Iterator[None]:
    """Keep Ray's and Tune's chatter out of the terminal unless ``verbose``.

    What they print to stdout (the raylet's "worker processes have been started" warning, which
    the driver prints whatever ``log_to_driver`` says) goes to ``log_path``; Tune's INFO lines
    ("Wrote the latest version of all result files") are not emitted. Workers' own output stays
    in Ray's log files when Ray was started with ``log_to_driver=False``
    (:func:`sisa_ray.executor.ensure_ray` does so unless asked to be verbose).
    """
    if verbose:
        yield
        return
    quiet = [logging.getLogger(n) for n in ("ray.tune", "ray.train", "ray.air")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_path, "a") as f, contextlib.redirect_stdout(f):
            yield
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def report(metrics: dict[str, float]) -> None:
    """Report one result of the running trial (the scheduler may stop the trial here)."""
    ray_tune.report(metrics)


class TrialObserver(Protocol):
    """What the experiment tells while it runs (see :class:`tune.tracking.MlflowTrials`)."""

    def trial_started(self, trial_id: str, config: dict) -> None: ...
    def trial_result(self, trial_id: str, metrics: dict, step: int) -> None: ...
    def trial_finished(self, trial_id: str, error: str | None) -> None: ...


class _ObserverCallback(ray_tune.Callback):
    """Tune's callback hooks, forwarded to a :class:`TrialObserver` in the driver as each trial
    starts, reports and ends, so a tracker shows trials while the experiment still runs."""

    def __init__(self, observer: TrialObserver) -> None:
        self._observer = observer

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._observer.trial_started(trial.trial_id, dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._observer.trial_result(trial.trial_id, measurements(result),
                                    int(result.get("training_iteration", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._observer.trial_finished(trial.trial_id, None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = getattr(trial, "error_file", None) or "trial failed"
        self._observer.trial_finished(trial.trial_id, str(error))


def measurements(result: dict) -> dict[str, float]:
    """The numbers a trial measured: numeric values minus Tune's bookkeeping."""
    return {k: v for k, v in (result or {}).items()
            if k not in BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool)}


class PerMethodASHA(FIFOScheduler):
    """Asynchronous successive halving (Li et al. 2020, "A System for Massively Parallel
    Hyperparameter Tuning"), one ASHA per method: a trial is stopped early only when it is
    behind trials of its OWN method at the same epoch. One ASHA over all trials would stop a
    method because another method is better, and the comparison needs every method's best.

    ``group`` maps a trial's config to its method.
    """

    # every result must reach the scheduler as it is reported (Tune may otherwise hand over
    # several at once, and a trial it should stop at epoch 1 runs on)
    _supports_buffered_results = False

    def __init__(self, group: Callable[[dict], str], *, metric: str | None = None,
                 mode: str | None = None, grace_period: int = 1,
                 reduction_factor: float = 2.0) -> None:
        super().__init__()
        self._group = group
        self._grace, self._rf = grace_period, reduction_factor
        self._asha: dict[str, ASHAScheduler] = {}
        self._metric, self._mode = metric, mode

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def _of(self, trial) -> ASHAScheduler:
        key = self._group(trial.config)
        if key not in self._asha:
            # max_t far away: a trial ends by itself when its method has run all its epochs
            self._asha[key] = ASHAScheduler(
                metric=self._metric, mode=self._mode, max_t=10**9, grace_period=self._grace,
                reduction_factor=self._rf, stop_last_trials=False,
            )
        return self._asha[key]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        asha = self._of(trial)
        if trial.trial_id in asha._trial_info:
            asha.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "Per-method ASHA: " + ", ".join(
            f"{k}: {a._num_stopped} stopped" for k, a in sorted(self._asha.items()))


def run_experiment(
    trainable: Callable[[dict], None],
    param_space: dict[str, Any] | Callable,
    *,
    search: str,
    num_samples: int,
    metric: str,
    mode: str,
    name: str,
    storage_path: str,
    seed: int = 0,
    resources: dict[str, float] | None = None,
    max_concurrent: int | None = None,
    scheduler: str = "asha",
    group: Callable[[dict], str] | None = None,
    observer: TrialObserver | None = None,
    verbose: bool = False,
    **constants: Any,
) -> list[dict[str, Any]]:
    """Run ONE Tune experiment; return ``[{"config", "metrics", "trial_id", "error",
    "iterations"}]``, one per trial, ``metrics`` being the trial's last result.

    ``param_space`` is a dict of Tune domains (random and grid search) or, for Optuna, a
    define-by-run function. ``constants`` reach the trainable through the object store
    (``tune.with_parameters``): large data is shipped once, not per trial. ``resources`` are
    one trial's (``{"cpu": 1, "gpu": 0.5}``). ``observer`` hears of every trial as it starts,
    reports and ends.
    """
    if search not in SEARCHES:
        raise ValueError(f"The 'search' parameter must be one of {list(SEARCHES)}. "
                         f"Got {search!r} instead.")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"The 'scheduler' parameter must be one of {list(SCHEDULERS)}. "
                         f"Got {scheduler!r} instead.")
    search_alg, space = None, param_space
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # a define-by-run space: the searcher owns metric and mode, TuneConfig must not repeat
        search_alg, space = OptunaSearch(space=param_space, metric=metric, mode=mode,
                                         seed=seed), {}
    else:
        from ray.tune.search import BasicVariantGenerator

        # Tune ignores max_concurrent_trials for a variant generator: it takes the bound itself
        search_alg = BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent or 0)
    sched = FIFOScheduler()
    if scheduler == "asha":
        sched = PerMethodASHA(group, metric=metric, mode=mode) if group is not None \
            else ASHAScheduler(metric=metric, mode=mode)
    owned = search == "optuna"
    wrapped = ray_tune.with_resources(ray_tune.with_parameters(trainable, **constants),
                                      resources or {"cpu": 1.0})
    # the legacy reporter honours verbose=0; the new one prints a box per experiment
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tuner = ray_tune.Tuner(
        wrapped,
        param_space=space,
        tune_config=ray_tune.TuneConfig(
            metric=None if owned else metric, mode=None if owned else mode,
            num_samples=num_samples, search_alg=search_alg,
            scheduler=sched, max_concurrent_trials=max_concurrent if owned else None,
        ),
        run_config=ray_tune.RunConfig(
            name=name, storage_path=storage_path, verbose=2 if verbose else 0,
            callbacks=[_ObserverCallback(observer)] if observer is not None else None,
        ),
    )
    grid = tuner.fit()
    out = []
    for result in grid:
        last = result.metrics or {}
        out.append({
            "config": dict(result.config or {}),
            "metrics": measurements(last),
            "trial_id": last.get("trial_id"),
            "iterations": int(last.get("training_iteration", 0)),
            "error": None if result.error is None else str(result.error),
        })
    return out

