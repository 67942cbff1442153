"""The runtime a shard's bits depend on, pinned wherever it trains (exactness invariant, rule 6).

PyTorch picks CPU kernels by the capability it detects (``ATEN_CPU_CAPABILITY``: default, avx2,
avx512, ...); kernels of different capabilities round differently, so a shard retrained on a node
of another CPU generation would not be bit-for-bit its fresh fit. A store records the capability
and the device it was trained with; every process that trains or serves a shard is started with
that capability in its environment (:func:`pinned_env`) and refuses to go on when it does not
dispatch to it (:func:`check_runtime`), e.g. on a node whose CPU lacks the instructions.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .config import TrainingConfig

if TYPE_CHECKING:  # torch is imported only where a model is trained: a driver need not load it
    import torch


class RuntimeMismatch(RuntimeError):
    """This process cannot train the store's shards bit-identically. The message says why and
    what to do; it holds only a string, so it crosses process (and Ray actor) boundaries."""


def current_cpu_capability() -> str:
    """The CPU capability this process dispatches to, as ``ATEN_CPU_CAPABILITY`` spells it."""
    import torch

    return torch.backends.cpu.get_cpu_capability().lower()


def pinned_env(training: TrainingConfig) -> dict[str, str]:
    """Environment variables a worker process must start with (set before torch loads)."""
    env = {}
    if training.cpu_capability:
        env["ATEN_CPU_CAPABILITY"] = training.cpu_capability
    if training.device == "cuda":
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS
    return env


def check_runtime(training: TrainingConfig, where: str = "this process") -> torch.device:
    """The device to train on, after checking this process honours the pinned runtime."""
    import torch

    check_capability(training.cpu_capability, where)
    if training.device == "cuda":
        # cuBLAS reads this when its first handle is made: set here it still covers an
        # in-process (local backend) run that has not touched CUDA yet; Ray workers start with it.
        for key, value in pinned_env(training).items():
            os.environ.setdefault(key, value)
    if training.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeMismatch(
            f"This store trains on CUDA, but {where} has no usable GPU. Run its shards on GPU "
            "nodes (--gpus-per-shard), or train a new store with --device cpu."
        )
    return torch.device(training.device)


def check_capability(want: str | None, where: str = "this process") -> None:
    """Refuse unless this process dispatches to the ``want`` CPU kernels (None: anything)."""
    if want is None:
        return
    have = current_cpu_capability()
    if want is not None and have != want:
        raise RuntimeMismatch(
            f"{where} runs PyTorch's {have!r} CPU kernels, but this store was trained with "
            f"{want!r} kernels, so results would not be bit-identical. Start it with "
            f"ATEN_CPU_CAPABILITY={want} (Ray workers get it automatically), on a CPU that "
            f"supports {want}; or train a new store there."
        )


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)
