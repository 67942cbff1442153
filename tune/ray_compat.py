"""Every fast-moving Ray Tune API the project touches, in one thin module (Ray 2.60).

An upgrade of Ray that renames ``tune.report``, ``RunConfig`` or the search algorithms is a change
to this file only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ray import tune as ray_tune

log = logging.getLogger(__name__)

SEARCHES = ("random", "grid", "optuna")


def report(metrics: dict[str, float]) -> None:
    """Report a trial's final metrics."""
    ray_tune.report(metrics)


def _distribution(spec: tuple):
    kind, *args = spec
    if kind == "loguniform":
        return ray_tune.loguniform(*args)
    if kind == "uniform":
        return ray_tune.uniform(*args)
    if kind == "choice":
        return ray_tune.choice(args[0])
    if kind == "randint":
        return ray_tune.randint(*args)
    raise ValueError(f"Unknown distribution kind {kind!r}.")


def param_space(space: dict[str, tuple[tuple, list]], search: str) -> dict[str, Any]:
    if search == "grid":
        return {k: ray_tune.grid_search(list(grid)) for k, (_, grid) in space.items()}
    return {k: _distribution(dist) for k, (dist, _) in space.items()}


def run_trials(
    trainable: Callable[[dict], None],
    space: dict[str, tuple[tuple, list]],
    *,
    search: str,
    num_samples: int,
    metric: str,
    mode: str,
    name: str,
    storage_path: str,
    seed: int = 0,
    cpus_per_trial: float = 1.0,
    max_concurrent: int | None = None,
    **constants: Any,
) -> list[dict[str, Any]]:
    """Run one Tuner; return ``[{"config": ..., "metrics": ..., "trial_id": ..., "error": ...}]``.

    ``constants`` are passed to the trainable through the object store
    (``tune.with_parameters``), so large data is shipped once, not per trial.
    """
    if search not in SEARCHES:
        raise ValueError(f"--search must be one of {list(SEARCHES)}. Got {search!r}.")
    search_alg = None
    samples = num_samples
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=seed)
    elif search == "grid":
        samples = 1  # the grid itself is the set of trials
    pspace = param_space(space, search)
    if not pspace:  # nothing to search: the defaults, once
        pspace, samples = {}, 1
    wrapped = ray_tune.with_resources(
        ray_tune.with_parameters(trainable, **constants), {"cpu": cpus_per_trial}
    )
    tuner = ray_tune.Tuner(
        wrapped,
        param_space=pspace,
        tune_config=ray_tune.TuneConfig(
            metric=metric, mode=mode, num_samples=samples, search_alg=search_alg,
            max_concurrent_trials=max_concurrent,
        ),
        run_config=ray_tune.RunConfig(name=name, storage_path=storage_path, verbose=0),
    )
    # the legacy reporter honours verbose=0; the new one prints a box per experiment
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    grid = tuner.fit()
    out = []
    for result in grid:
        out.append({
            "config": dict(result.config or {}),
            "metrics": {k: v for k, v in (result.metrics or {}).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "trial_id": (result.metrics or {}).get("trial_id"),
            "error": None if result.error is None else str(result.error),
        })
    return out
