"""The settings of one comparison (:class:`CompareConfig`) and its presets.

Pure and light: the command line reads the defaults for ``--help`` without importing torch or
Ray; the methods are looked up (importing :mod:`approx`) only when a config is validated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from sisa_ray.core.config import check_choice, check_int, check_number

TARGETS = ("monolith", "sisa")
SEARCHES = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")

# Named settings for `sisa-ray compare --preset NAME`; options given on the command line win.
PRESETS: dict[str, dict] = {
    # F needs many models: 32 seeds of every model on digits, sized for 2 CPU cores
    "f32": {"dataset": "digits", "forget": "random:0.1", "target": "monolith", "seeds": 32,
            "epochs": 10, "hidden": 64, "num_samples": 2, "methods": ("all",)},
}


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Everything one comparison depends on (logged as the MLflow parent run's params)."""

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
    scheduler: str = "asha"
    seeds: int = 3
    extra_fraction: float = 0.1
    max_train: int | None = None
    seed: int = 0
    mlflow_uri: str | None = None
    experiment: str = "sisa-ray-compare"
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    out: str | None = None

    def __post_init__(self) -> None:
        owner = "CompareConfig"
        check_choice(owner, "target", self.target, TARGETS)
        check_choice(owner, "search", self.search, SEARCHES)
        check_choice(owner, "scheduler", self.scheduler, SCHEDULERS)
        for name in ("num_samples", "seeds", "epochs", "shards", "slices"):
            check_int(owner, name, getattr(self, name), 1)
        check_number(owner, "cpus_per_trial", self.cpus_per_trial, 0.0, strict=True)
        check_number(owner, "gpus_per_trial", self.gpus_per_trial, 0.0)
        if self.max_concurrent is not None:
            check_int(owner, "max_concurrent", self.max_concurrent, 1)
        if not 0 < self.extra_fraction < 1:
            raise ValueError(f"The 'extra_fraction' parameter of {owner} must be in (0, 1). "
                             f"Got {self.extra_fraction!r} instead.")
        from approx import parse_request

        parse_request(self.forget)  # fail early on a malformed request
        self.method_names()

    def method_names(self, task: str = "classification", kind: str | None = None) -> list[str]:
        """The methods to compare; ``all`` means every method that supports the task and the
        request kind."""
        from approx import get_method, list_methods

        if tuple(self.methods) == ("all",):
            return [m for m in list_methods() if task in get_method(m).tasks
                    and (kind is None or kind in get_method(m).kinds)]
        for m in self.methods:
            get_method(m)
        return list(self.methods)

    def params(self, methods: list[str], out: Path) -> dict:
        """The config as MLflow params: the methods actually compared and the real output
        directory, not the ``all`` and ``None`` the user may have left them at."""
        return {**dataclasses.asdict(self), "methods": ",".join(methods), "out": str(out)}
