"""The method registry and the one signature every approximate method has.

A method is a function ``fn(model, data, config, device, seed) -> nn.Module | (nn.Module, dict)``
registered with :func:`register`. :func:`run_method` does what is common to all: checks the config
type, the request kind and the data the method needs, copies the model (the input is never
modified), seeds every random stream from ``seed`` without touching the caller's global RNG
state, and times the call.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sisa_ray.core.data import SampleSet
from sisa_ray.core.training import deterministic_torch, seeded

from .requests import KINDS, ForgetRequest

DATA_FIELDS = ("forget", "retain", "validation", "extra")


@dataclass(frozen=True)
class UnlearningData:
    """The data an approximate method may use.

    ``forget`` and ``retain`` partition the training set; ``validation`` is held-out data from the
    training distribution; ``extra`` is additional labelled data the model never saw (Twin MU builds
    its twin problem on it). ``request`` is the forget request, whose kind methods check.
    """

    forget: SampleSet | None
    retain: SampleSet | None
    request: ForgetRequest
    validation: SampleSet | None = None
    extra: SampleSet | None = None

    def full(self) -> SampleSet:
        """Forget and retain together: the original training set."""
        parts = [p for p in (self.retain, self.forget) if p is not None and len(p)]
        return SampleSet(
            ids=np.concatenate([p.ids for p in parts]),
            features=np.concatenate([p.features for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            n_classes=parts[0].n_classes, name="train", task=parts[0].task,
        )


@dataclass
class UnlearnResult:
    """The unlearned model (a new object), wall time, and per-phase timings."""

    model: nn.Module
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., Any]
    config_cls: type
    kinds: tuple[str, ...]
    needs: tuple[str, ...]
    reference: str
    tasks: tuple[str, ...] = ("classification",)

    def default_config(self):
        return self.config_cls()


_REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str, *, config: type, kinds: tuple[str, ...] = KINDS,
    needs: tuple[str, ...] = ("forget", "retain"), reference: str = "",
    tasks: tuple[str, ...] = ("classification",),
) -> Callable[[Callable], Callable]:
    """Register a method under ``name``. Duplicate names are refused, never overwritten."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"The config of method {name!r} must be a dataclass. Got {config!r}.")
    unknown_kinds = sorted(set(kinds) - set(KINDS))
    unknown_needs = sorted(set(needs) - set(DATA_FIELDS))
    if unknown_kinds or unknown_needs:
        raise ValueError(
            f"Method {name!r}: unknown kinds {unknown_kinds} / data fields {unknown_needs}; "
            f"kinds are {list(KINDS)}, data fields {list(DATA_FIELDS)}."
        )

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(
                f"A method named {name!r} is already registered "
                f"({_REGISTRY[name].fn.__module__}). Choose another name."
            )
        _REGISTRY[name] = MethodSpec(name, fn, config, tuple(kinds), tuple(needs), reference,
                                     tuple(tasks))
        return fn

    return deco


def _load_all() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods)


def list_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"Unknown unlearning method {name!r}. Known methods: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def run_method(
    name: str,
    model: nn.Module,
    data: UnlearningData,
    config: Any = None,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    threads: int | None = None,
) -> UnlearnResult:
    """Run method ``name`` on a copy of ``model``.

    Two calls with the same arguments give bit-identical weights (deterministic kernels, every
    random stream seeded from ``seed``).
    """
    spec = get_method(name)
    if config is None:
        config = spec.default_config()
    if not isinstance(config, spec.config_cls):
        raise TypeError(
            f"Method {name!r} takes a {spec.config_cls.__name__}. Got {type(config).__name__}."
        )
    if not isinstance(data, UnlearningData):
        raise TypeError(f"data must be an UnlearningData. Got {type(data).__name__}.")
    part = data.forget if data.forget is not None else data.retain
    task = part.task if part is not None else "classification"
    if task not in spec.tasks:
        raise ValueError(
            f"Method {name!r} does not support {task}; it supports {list(spec.tasks)}. "
            "Choose another method for this task."
        )
    kind = data.request.kind
    if kind not in spec.kinds:
        raise ValueError(
            f"Method {name!r} does not support {kind!r} forget requests; it supports "
            f"{list(spec.kinds)}. Choose another method for this request."
        )
    for need in spec.needs:
        part = getattr(data, need)
        if part is None or len(part) == 0:
            raise ValueError(
                f"Method {name!r} needs a non-empty {need!r} set, and none was given. "
                f"Pass UnlearningData({need}=...)."
            )
    device = torch.device(device)
    work = copy.deepcopy(model).to(device)
    t0 = time.perf_counter()
    with deterministic_torch(threads or torch.get_num_threads()), seeded(seed, device):
        out = spec.fn(work, data, config, device, seed)
    seconds = time.perf_counter() - t0
    model_out, timings = out if isinstance(out, tuple) else (out, {})
    return UnlearnResult(model_out.eval(), seconds, dict(timings))
