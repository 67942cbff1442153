"""Search spaces of the approximate methods, around each paper's defaults, as Ray Tune domains.

Each method's space maps a field of its config dataclass to ``(domain, grid)``: a Tune domain
(``tune.loguniform``, ``tune.uniform``, ``tune.choice``) sampled by random and Optuna search, and a
short list of values that grid search tries. :func:`experiment_space` turns the spaces of several
methods into the ``param_space`` of ONE Tune experiment whose first dimension is the method.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from ray import tune as ray_tune

from approx import get_method

Space = dict[str, tuple[Any, list]]

# method -> {config field: (Tune domain, grid values)}
SPACES: dict[str, Space] = {
    "finetune": {
        "lr": (ray_tune.loguniform(0.01, 0.2), [0.02, 0.1]),
        "epochs": (ray_tune.choice([2, 5, 10]), [5]),
    },
    "random_labels": {
        "lr": (ray_tune.loguniform(1e-5, 1e-3), [1e-4, 1e-3]),
        "epochs": (ray_tune.choice([1, 3, 5]), [3]),
    },
    "fisher_forgetting": {
        "alpha": (ray_tune.loguniform(1e-8, 1e-4), [1e-7, 1e-6, 1e-5]),
    },
    "fisher_masking": {
        "mask_ratio": (ray_tune.loguniform(0.005, 0.1), [0.01, 0.02, 0.05]),
        "epochs": (ray_tune.choice([0, 10, 30]), [30]),
    },
    "ssd": {
        "alpha": (ray_tune.loguniform(1.0, 100.0), [5.0, 10.0, 20.0]),
        "lam": (ray_tune.uniform(0.1, 1.0), [0.5, 1.0]),
    },
    "negative_gradient": {
        "lr": (ray_tune.loguniform(1e-4, 1e-2), [1e-3, 1e-2]),
        "retain_weight": (ray_tune.choice([0.0, 0.5, 1.0]), [0.0, 1.0]),
    },
    "bad_teacher": {
        "lr": (ray_tune.loguniform(1e-5, 1e-3), [1e-4, 1e-3]),
        "temperature": (ray_tune.choice([1.0, 2.0, 4.0]), [1.0]),
    },
    "random_perturbation": {
        "beta": (ray_tune.loguniform(0.01, 1.0), [0.1, 0.5]),
        "lr": (ray_tune.loguniform(1e-3, 0.05), [0.01]),
    },
    "pbu": {
        "lr": (ray_tune.loguniform(1e-4, 1e-2), [1e-3]),
        "gamma": (ray_tune.loguniform(1e-3, 1e-1), [1e-2, 1e-1]),
    },
    "adversarial": {
        "lr": (ray_tune.loguniform(1e-4, 1e-2), [1e-3]),
        "adv_weight": (ray_tune.loguniform(0.1, 10.0), [1.0, 3.0]),
    },
    "twin_mu": {
        "lr": (ray_tune.loguniform(1e-3, 0.05), [0.005, 0.01]),
        "epochs": (ray_tune.choice([2, 5]), [5]),
    },
    "layer_reset": {
        "lr": (ray_tune.loguniform(1e-4, 1e-2), [1e-3]),
        "temperature": (ray_tune.choice([2.0, 5.0]), [5.0]),
    },
}


# Regression targets are not probabilities: SGD at classification learning rates diverges on a
# squared error over targets in the hundreds, so regression searches Adam at smaller rates.
REGRESSION_SPACES: dict[str, Space] = {
    "finetune": {
        "lr": (ray_tune.loguniform(1e-4, 1e-2), [1e-3, 1e-2]),
        "epochs": (ray_tune.choice([2, 5, 10]), [5]),
        "optimizer": (ray_tune.choice(["adam"]), ["adam"]),
        "weight_decay": (ray_tune.choice([0.0]), [0.0]),
    },
    "random_labels": {
        "lr": (ray_tune.loguniform(1e-4, 1e-2), [1e-3, 1e-2]),
        "epochs": (ray_tune.choice([1, 3, 5]), [3]),
    },
}


def space_for(method: str, task: str = "classification") -> Space:
    """The search space of ``method`` for ``task`` (an unknown method gets a clear error; a
    method without a space is searched over its defaults only)."""
    spec = get_method(method)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    space = (REGRESSION_SPACES if task == "regression" else SPACES).get(method, {})
    bad = sorted(set(space) - fields)
    if bad:
        raise ValueError(f"Search space of {method!r} names unknown config fields {bad}.")
    return space


def experiment_space(methods: list[str], task: str, search: str) -> dict[str, Any]:
    """The ``param_space`` of one Tune experiment over every method in ``methods``.

    Random search: ``{"method": grid_search(methods), m: {field: domain}}`` for every method
    ``m``; with ``num_samples = n`` Tune runs ``n`` trials per method, and a trial reads only its
    own method's sub-dict (the conditional space; the others are drawn and ignored, so the
    draws, seeded once, do not depend on the order of trials). Grid search: one grid point per
    method and combination of its grid values, ``{"point": grid_search([{"method": m, m: {...}},
    ...])}`` (a product over every method's grid would multiply the methods' grids together).
    :func:`trial_point` reads either shape back.
    """
    if search == "grid":
        points = []
        for m in methods:
            space = space_for(m, task)
            names = list(space)
            for values in itertools.product(*(space[n][1] for n in names)):
                points.append({"method": m, m: dict(zip(names, values))})
        return {"point": ray_tune.grid_search(points)}
    out: dict[str, Any] = {"method": ray_tune.grid_search(list(methods))}
    for m in methods:
        out[m] = {name: domain for name, (domain, _) in space_for(m, task).items()}
    return out


class OptunaSpace:
    """A define-by-run space for Optuna: the method is a categorical choice and only its own
    parameters are suggested (Optuna's conditional spaces). Names ``method/field`` come back
    from Tune as the nested ``{method: {field: value}}`` of :func:`experiment_space`. A class,
    not a closure: Tune pickles the searcher, space included, into its experiment state."""

    def __init__(self, methods: list[str], task: str) -> None:
        self.methods, self.task = list(methods), task

    def __call__(self, trial) -> None:
        method = trial.suggest_categorical("method", self.methods)
        for name, (domain, _) in space_for(method, self.task).items():
            key = f"{method}/{name}"
            if isinstance(domain, ray_tune.search.sample.Categorical):
                trial.suggest_categorical(key, list(domain.categories))
            elif isinstance(domain.get_sampler(), ray_tune.search.sample.LogUniform):
                trial.suggest_float(key, domain.lower, domain.upper, log=True)
            else:
                trial.suggest_float(key, domain.lower, domain.upper)


def optuna_space(methods: list[str], task: str) -> OptunaSpace:
    """The define-by-run space of :class:`OptunaSpace` over ``methods``."""
    return OptunaSpace(methods, task)


def trial_point(config: dict) -> tuple[str, dict]:
    """``(method, its parameters)`` of a trial's config, whichever search produced it."""
    point = config.get("point", config)
    method = point["method"]
    return method, dict(point.get(method) or {})


def config_from(method: str, params: dict) -> object:
    """The method's config dataclass with ``params`` over its defaults (unknown keys refused)."""
    spec = get_method(method)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"Unknown parameter(s) {unknown} for method {method!r}; its config "
                         f"{spec.config_cls.__name__} has {sorted(fields)}.")
    return dataclasses.replace(spec.default_config(), **params)
