"""Search spaces of the approximate methods, around each paper's defaults.

Backend-neutral: each parameter is ``(kind, *args)`` with kind ``loguniform``, ``uniform``,
``choice`` or ``randint``, plus a short ``grid`` of values for grid search. ``ray_compat``
translates them into Ray Tune's objects. Pure Python: no Ray here.
"""

from __future__ import annotations

import dataclasses

from approx import get_method

# method -> {param: (distribution, grid values)}
SPACES: dict[str, dict[str, tuple[tuple, list]]] = {
    "finetune": {
        "lr": (("loguniform", 0.01, 0.2), [0.02, 0.1]),
        "epochs": (("choice", [2, 5, 10]), [5]),
    },
    "random_labels": {
        "lr": (("loguniform", 1e-5, 1e-3), [1e-4, 1e-3]),
        "epochs": (("choice", [1, 3, 5]), [3]),
    },
    "fisher_forgetting": {
        "alpha": (("loguniform", 1e-8, 1e-4), [1e-7, 1e-6, 1e-5]),
    },
    "fisher_masking": {
        "mask_ratio": (("loguniform", 0.005, 0.1), [0.01, 0.02, 0.05]),
        "epochs": (("choice", [0, 10, 30]), [30]),
    },
    "ssd": {
        "alpha": (("loguniform", 1.0, 100.0), [5.0, 10.0, 20.0]),
        "lam": (("uniform", 0.1, 1.0), [0.5, 1.0]),
    },
    "negative_gradient": {
        "lr": (("loguniform", 1e-4, 1e-2), [1e-3, 1e-2]),
        "retain_weight": (("choice", [0.0, 0.5, 1.0]), [0.0, 1.0]),
    },
    "bad_teacher": {
        "lr": (("loguniform", 1e-5, 1e-3), [1e-4, 1e-3]),
        "temperature": (("choice", [1.0, 2.0, 4.0]), [1.0]),
    },
    "random_perturbation": {
        "beta": (("loguniform", 0.01, 1.0), [0.1, 0.5]),
        "lr": (("loguniform", 1e-3, 0.05), [0.01]),
    },
    "pbu": {
        "lr": (("loguniform", 1e-4, 1e-2), [1e-3]),
        "gamma": (("loguniform", 1e-3, 1e-1), [1e-2, 1e-1]),
    },
    "adversarial": {
        "lr": (("loguniform", 1e-4, 1e-2), [1e-3]),
        "adv_weight": (("loguniform", 0.1, 10.0), [1.0, 3.0]),
    },
    "twin_mu": {
        "lr": (("loguniform", 1e-3, 0.05), [0.005, 0.01]),
        "epochs": (("choice", [2, 5]), [5]),
    },
}


# Regression targets are not probabilities: SGD at classification learning rates diverges on a
# squared error over targets in the hundreds, so regression searches Adam at smaller rates.
REGRESSION_SPACES: dict[str, dict[str, tuple[tuple, list]]] = {
    "finetune": {
        "lr": (("loguniform", 1e-4, 1e-2), [1e-3, 1e-2]),
        "epochs": (("choice", [2, 5, 10]), [5]),
        "optimizer": (("choice", ["adam"]), ["adam"]),
        "weight_decay": (("choice", [0.0]), [0.0]),
    },
    "random_labels": {
        "lr": (("loguniform", 1e-4, 1e-2), [1e-3, 1e-2]),
        "epochs": (("choice", [1, 3, 5]), [3]),
    },
}


def space_for(method: str, task: str = "classification") -> dict[str, tuple[tuple, list]]:
    """The search space of ``method`` for ``task`` (an unknown method gets a clear error; a
    method without a space is searched over its defaults only)."""
    spec = get_method(method)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    space = (REGRESSION_SPACES if task == "regression" else SPACES).get(method, {})
    bad = sorted(set(space) - fields)
    if bad:
        raise ValueError(f"Search space of {method!r} names unknown config fields {bad}.")
    return space


def config_from(method: str, params: dict) -> object:
    """The method's config dataclass with ``params`` over its defaults (unknown keys refused)."""
    spec = get_method(method)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"Unknown parameter(s) {unknown} for method {method!r}; its config "
                         f"{spec.config_cls.__name__} has {sorted(fields)}.")
    return dataclasses.replace(spec.default_config(), **params)
