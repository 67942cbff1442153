"""``ShardTrainer``: the plain Python class that owns one shard.

It trains its shard slice by slice from a job description, writes a checkpoint after every slice
to a new versioned directory, and serves predictions from the live checkpoint. It knows nothing
of Ray: the executor turns it into an actor (``ray.remote(...)(ShardTrainer)``), unit tests
construct it directly. Every method is idempotent: running a job twice writes the same bytes to
the same paths, because Ray may retry a call after a failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import torch

from .core.checkpoint import Checkpoint, ids_digest, sha256
from .core.config import SISAConfig
from .core.data import SampleSet
from .core.manifest import FileRef, ShardEntry, read_manifest, shard_dir
from .core.plan import assign
from .core.runtime import check_runtime
from .core.store import Store, StoreError
from .core.training import (
    deterministic_torch,
    init_seed,
    make_optimizer,
    predict_proba,
    train_steps,
)
from .models import build_model

log = logging.getLogger(__name__)


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


def read_store_meta(store: Store) -> dict:
    """``store.json``, checked: its format, and that it holds a config."""
    from .core.manifest import STORE_META

    raw = store.read_optional(STORE_META)
    if raw is None:
        raise StoreError(
            f"No sisa-ray ensemble at {store.location}. Train one first: "
            f"`sisa-ray train --store {store.location}`."
        )
    meta = store.read_json(STORE_META, raw)
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise StoreError(
            f"{store.location}/{STORE_META} has format {got!r}; this sisa-ray reads format "
            f"{STORE_FORMAT}. Use the sisa-ray version that wrote the store, or train a new one."
        )
    missing = [k for k in ("config", "config_hash", "dataset") if k not in meta]
    if missing:
        raise StoreError(
            f"{store.location}/{STORE_META} lacks {missing}: it was edited or cut short. "
            "Restore it from backup, or train a new store."
        )
    return meta


STORE_FORMAT = 2


class ShardTrainer:
    """Owns shard ``shard`` of the ensemble stored at ``store_uri``."""

    def __init__(self, store_uri: str, shard: int) -> None:
        self.store = Store(store_uri)
        self.shard = shard
        meta = read_store_meta(self.store)
        self.config = SISAConfig.from_dict(meta["config"])
        self.config_hash = meta["config_hash"]
        # the pinned runtime: refuse here, before anything is trained, on a node that differs
        self.device = check_runtime(self.config.training, where=f"The worker of shard {shard}")
        self.input_shape = self.config.training.input_shape
        self.n_classes = self.config.training.n_classes
        self.task = meta["dataset"]["task"]
        torch.set_num_threads(self.config.training.threads)
        # A first optimizer import pulls in torch._dynamo (seconds of CPU). Pay it at start-up,
        # once per process, rather than inside the first (timed) training job.
        make_optimizer(self._new_model(), self.config.training)
        self._live: torch.nn.Module | None = None
        self._live_version: int | None = None
        self.reload()

    # -- serving -----------------------------------------------------------------------------------

    def reload(self) -> int | None:
        """Load the live checkpoint named by the manifest; return its version (None if untrained)."""
        manifest = read_manifest(self.store)
        if manifest is None or self.shard >= len(manifest.shards):
            self._live, self._live_version = None, None
            return None
        entry = manifest.shards[self.shard]
        if entry.version == self._live_version:
            return entry.version
        if entry.n_samples == 0:
            self._live = None  # abstains
        else:
            ckpt = self._load_checkpoint(entry.checkpoints[-1])
            model = self._new_model()
            model.load_state_dict(ckpt.model_state)
            self._live = model.to(self.device).eval()
        self._live_version = entry.version
        return entry.version

    def predict_proba(self, features: np.ndarray) -> np.ndarray | None:
        """Class probabilities from the live model, or None when the shard abstains."""
        if self._live is None:
            if self._live_version is None:
                raise StoreError(f"Shard {self.shard} has no trained model yet. Run fit first.")
            return None
        with deterministic_torch(self.config.training.threads):
            return predict_proba(self._live, features, self.device, task=self.task)

    def live_version(self) -> int | None:
        return self._live_version

    def ping(self) -> int:
        return self.shard

    # -- training ----------------------------------------------------------------------------------

    def _new_model(self) -> torch.nn.Module:
        t = self.config.training
        return build_model(
            t.model, self.input_shape, self.n_classes, hidden=t.hidden,
            seed=init_seed(self.config.sharding, self.shard),
        )

    def _load_checkpoint(self, ref: FileRef) -> Checkpoint:
        data = self.store.read_bytes(ref.path)
        return Checkpoint.from_bytes(
            data, where=f"{self.store.location}/{ref.path}", expected_sha256=ref.sha256,
            expected_config_hash=self.config_hash,
        )

    def _read_samples(self, ref: FileRef) -> SampleSet:
        raw = self.store.read_bytes(ref.path)
        if sha256(raw) != ref.sha256:
            raise StoreError(
                f"Shard data '{self.store.location}/{ref.path}' is corrupt: its SHA-256 does not "
                "match the manifest. Restore it from backup or retrain on a new --store."
            )
        return SampleSet.from_arrow(_read_parquet(raw))

    def train(self, job: TrainJob | dict) -> dict:
        """Run a :class:`TrainJob`; return a :class:`TrainResult` as a dict."""
        if isinstance(job, dict):
            job = TrainJob(**job)
        if job.shard != self.shard:
            raise ValueError(f"Job for shard {job.shard} sent to the trainer of shard {self.shard}.")
        t0 = time.perf_counter()
        sharding, training = self.config.sharding, self.config.training
        samples = self._read_samples(FileRef(**job.data))
        out_dir = shard_dir(self.shard, job.version)
        data_ref = FileRef(**job.data)
        if job.remove_ids:
            samples = samples.without_ids(np.asarray(job.remove_ids, dtype=np.int64))
            blob = _parquet_bytes(samples.to_arrow())
            data_ref = FileRef(f"{out_dir}/data.parquet", sha256(blob))
            self.store.write_bytes(data_ref.path, blob)
        shard_of, slice_of = assign(samples.ids, sharding)
        if (shard_of != self.shard).any():
            raise StoreError(
                f"Shard data '{data_ref.path}' holds ids of other shards; the store mixes configs."
            )

        model = self._new_model().to(self.device)
        optimizer = make_optimizer(model, training)
        checkpoints = [FileRef(**c) for c in job.base_checkpoints[: job.start_step]]
        if len(checkpoints) != job.start_step:
            raise ValueError(
                f"Restarting shard {self.shard} at step {job.start_step} needs {job.start_step} "
                f"base checkpoints; got {len(checkpoints)}."
            )
        if job.start_step > 0:
            base = self._load_checkpoint(checkpoints[-1])
            expected = ids_digest(samples.ids[slice_of <= job.start_step - 1])
            if base.ids_digest != expected:
                raise StoreError(
                    f"Shard {self.shard}: the checkpoint after step {job.start_step - 1} saw other "
                    "samples than the retained data holds, so it is not a clean restart point. "
                    "The store is inconsistent; run `sisa-ray verify` or retrain on a new --store."
                )
            model.load_state_dict(base.model_state)
            optimizer.load_state_dict(base.optimizer_state)

        total_steps = 0
        t_train = time.perf_counter()
        with deterministic_torch(training.threads):
            for res in train_steps(
                model, optimizer, samples.features, samples.labels, samples.ids, slice_of,
                sharding=sharding, training=training, shard=self.shard,
                start_step=job.start_step, device=self.device, task=self.task,
            ):
                total_steps += res.sample_steps
                ckpt = Checkpoint(
                    shard=self.shard, step=res.step, config_hash=self.config_hash,
                    ids_digest=ids_digest(res.ids), n_samples=res.n_samples,
                    model_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                    optimizer_state=_cpu_state(optimizer.state_dict()),
                )
                blob = ckpt.to_bytes()
                ref = FileRef(f"{out_dir}/step_{res.step:03d}.pt", sha256(blob))
                self.store.write_bytes(ref.path, blob)
                checkpoints.append(ref)
        train_seconds = time.perf_counter() - t_train
        entry = ShardEntry(
            shard=self.shard, version=job.version, n_samples=len(samples),
            slice_counts=np.bincount(slice_of, minlength=sharding.n_slices).tolist(),
            data=data_ref, checkpoints=checkpoints,
        )
        log.debug("shard %d v%d trained from step %d", self.shard, job.version, job.start_step)
        return asdict(TrainResult(
            entry=entry.to_dict(), sample_steps=total_steps,
            seconds=time.perf_counter() - t0, train_seconds=train_seconds,
            start_step=job.start_step,
        ))

    def checkpoint_states(self, entry: dict) -> list[dict[str, torch.Tensor]]:
        """Model states of every checkpoint of a shard entry (for verification)."""
        e = ShardEntry.from_dict(entry)
        return [self._load_checkpoint(c).model_state for c in e.checkpoints]


def _cpu_state(state):
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: _cpu_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu_state(v) for v in state)
    return state


def _parquet_bytes(table: pa.Table) -> bytes:
    import io

    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _read_parquet(raw: bytes) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(raw))
