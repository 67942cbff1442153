"""What the driver asks a worker to do, and what comes back: plain data that crosses processes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainJob:
    """Train shard ``shard`` into version ``version``.

    The shard's samples are those of ``data`` minus ``remove_ids``. Steps before ``start_step`` are
    kept from ``base_checkpoints`` (the last clean slices); steps from ``start_step`` on are trained.
    """

    shard: int
    version: int
    data: dict  # FileRef as a dict
    start_step: int = 0
    base_checkpoints: list[dict] = field(default_factory=list)
    remove_ids: list[int] = field(default_factory=list)


@dataclass
class TrainResult:
    entry: dict  # ShardEntry as a dict
    sample_steps: int
    seconds: float
    train_seconds: float
    start_step: int
