"""What the driver asks a worker to do, and what comes back: plain data that crosses processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    # a fresh fit of in-memory data: the shard's rows as an Arrow table, which the worker writes
    # to ``data["path"]`` itself (so shard files are written in parallel, each by the worker that
    # trains it, not one after another by the driver); None: ``data`` is in the store already
    rows: Any = None
    # cores the job may use for ``micro_batches > 1`` (the executor's idle workers): speed only,
    # never the bits, which do not depend on it
    parallel: int = 1

    def shard_ids(self, store) -> Any:
        """The ids of the shard's rows, from ``rows`` or from the store."""
        table = self.rows if self.rows is not None else store.read_table(
            self.data["path"], columns=["id"])
        return table.column("id").to_numpy()

    def size(self, store) -> int:
        """Bytes of the shard's data: what orders a fit's jobs, largest first."""
        return self.rows.nbytes if self.rows is not None else store.size(self.data["path"])


@dataclass
class TrainResult:
    entry: dict  # ShardEntry as a dict
    sample_steps: int
    seconds: float
    train_seconds: float  # the slice steps, checkpoints included
    start_step: int
    # where ``seconds`` went: "data" (read, SHA-256 check, rows removed and written back),
    # "features" (a frozen backbone's), "setup" (model, optimiser, base checkpoint),
    # "compute" (forward and backward passes only), "checkpoint" (serialise, hash, write)
    phases: dict = field(default_factory=dict)
    threads: int = 1  # the cores that computed it (micro-batches in parallel): speed, not bits
