"""``ShardWorker``: the plain Python class that trains and serves shards.

It trains a shard slice by slice from a job description, writes a checkpoint after every slice
to a new versioned directory, and serves predictions from live checkpoints. It knows nothing of
Ray: the executor turns it into an actor (``ray.remote(...)(ShardWorker)``), unit tests construct
it directly. Every method is idempotent: running a job twice writes the same bytes to the same
paths, because Ray may retry a call after a failure.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .core.checkpoint import Checkpoint, ids_digest, sha256
from .core.config import SISAConfig
from .core.data import SampleSet
from .core.jobs import TrainJob, TrainResult
from .core.manifest import FileRef, ShardEntry, read_store_meta, shard_dir
from .core.plan import PLACEMENT_FILE, assign, load_placement
from .core.runtime import check_runtime, usable_cores
from .core.store import Store, StoreError
from .core.training import (
    deterministic_torch,
    init_seed,
    make_optimizer,
    predict_proba,
    train_steps,
)
from .models import build_model
from .transfer import BACKBONE_FILE, cached_embedding, embed, load_backbone, with_embedding

log = logging.getLogger(__name__)




class ShardWorker:
    """Trains and serves any number of shards of the ensemble stored at ``store_uri``.

    Isolation in SISA is per shard (its own data, model, optimizer, random streams and
    checkpoints), not per process: every job builds its shard's model from the shard's seed and
    its own checkpoints, so one worker process hosts many shards, and the number of workers
    follows the cluster's cores instead of the number of shards. Live models for predictions are
    loaded on demand and kept in a least-recently-used cache bounded by ``cache_mb``; they are
    keyed by the checkpoint's path and SHA-256, so a newer generation can never be served stale.
    """

    def __init__(self, store_uri: str, cache_mb: float = 512.0,
                 idle_timeout_s: float | None = None, on_stop=None) -> None:
        self.store = Store(store_uri)
        meta = read_store_meta(self.store)
        self.config = SISAConfig.from_dict(meta["config"])
        self.config_hash = meta["config_hash"]
        # the pinned runtime: refuse here, before anything is trained, on a node that differs
        self.device = check_runtime(self.config.training, where="This worker")
        self.input_shape = self.config.training.input_shape
        if self.config.sharding.placement != "hash":
            load_placement(self.store.read_table(PLACEMENT_FILE), self.config.sharding)
        self.backbone = None
        self.head_shape = self.input_shape
        if self.config.training.backbone is not None:
            self._load_backbone()
        self.n_classes = self.config.training.n_classes
        self.task = meta["dataset"]["task"]
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[tuple[str, str], tuple[torch.nn.Module, int]] = OrderedDict()
        self._cache_lock = threading.Lock()
        torch.set_num_threads(self.config.training.threads)
        # A first optimizer import pulls in torch._dynamo (seconds of CPU). Pay it at start-up,
        # once per process, rather than inside the first (timed) training job.
        make_optimizer(self._new_model(0), self.config.training)
        self._last_call = time.monotonic()
        if idle_timeout_s is not None and on_stop is not None:
            threading.Thread(target=self._watch, args=(idle_timeout_s, on_stop),
                             daemon=True).start()

    def _watch(self, idle_timeout_s: float, on_stop) -> None:
        """A long-lived worker stops itself when its store is gone (or retrained under another
        config) or it sat idle too long, so nothing outlives the store it serves."""
        period = min(30.0, idle_timeout_s / 4)
        while True:
            time.sleep(period)
            try:
                gone = read_store_meta(self.store)["config_hash"] != self.config_hash
            except StoreError:
                gone = True
            if gone or time.monotonic() - self._last_call > idle_timeout_s:
                log.info("worker of %s stops (%s)", self.store.location,
                         "store gone" if gone else "idle")
                on_stop()
                return

    def _load_backbone(self) -> None:
        """The frozen backbone the config names by SHA-256; any other file is refused."""
        from .transfer import feature_width

        blob = self.store.read_bytes(BACKBONE_FILE)
        bb = load_backbone(blob, f"{self.store.location}/{BACKBONE_FILE}")
        if bb.sha256 != self.config.training.backbone:
            raise StoreError(
                f"{self.store.location}/{BACKBONE_FILE} has SHA-256 {bb.sha256}, but the config "
                f"records {self.config.training.backbone}: the backbone was replaced. Restore it "
                "from backup or retrain on a new --store."
            )
        if tuple(bb.input_shape) != tuple(self.input_shape):
            raise StoreError(
                f"The backbone takes samples of shape {bb.input_shape}; this store's data has "
                f"{self.input_shape}. Pretrain a backbone on data of the same shape."
            )
        self.backbone = bb.module(self.device)
        self.head_shape = (feature_width(self.backbone, tuple(self.input_shape)),)

    def _features(self, features: np.ndarray) -> np.ndarray:
        """What the models see: the raw features, or the frozen backbone's features of them."""
        if self.backbone is None:
            return features
        with deterministic_torch(self.config.training.threads):
            return embed(self.backbone, features, self.device)

    def ping(self) -> str:
        return self.config_hash

    # -- serving -----------------------------------------------------------------------------------

    def predict_proba(self, entries: list[dict], features: np.ndarray) -> list[np.ndarray | None]:
        """Probabilities of each shard's live model (given by its manifest entry), or None for a
        shard left with no samples (it abstains)."""
        self._last_call = time.monotonic()
        out = []
        if any(d["n_samples"] for d in entries):
            features = self._features(features)
        for d in entries:
            entry = ShardEntry.from_dict(d)
            if entry.n_samples == 0:
                out.append(None)
                continue
            model = self._live_model(entry)
            with deterministic_torch(self.config.training.threads):
                out.append(predict_proba(model, features, self.device, task=self.task))
        _release_free_memory()
        return out

    def _live_model(self, entry: ShardEntry) -> torch.nn.Module:
        ref = entry.checkpoints[-1]
        key = (ref.path, ref.sha256)
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit[0]
        model = self._new_model(entry.shard)
        model.load_state_dict(self._load_checkpoint(ref).model_state)
        model = model.to(self.device).eval()
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        with self._cache_lock:
            self._cache[key] = (model, size)
            total = sum(sz for _, sz in self._cache.values())
            while total > self.cache_bytes and len(self._cache) > 1:
                _, (_, sz) = self._cache.popitem(last=False)
                total -= sz
        return model

    def cached_models(self) -> int:
        return len(self._cache)

    # -- training ----------------------------------------------------------------------------------

    def _new_model(self, shard: int) -> torch.nn.Module:
        t = self.config.training
        return build_model(
            t.model, self.head_shape, self.n_classes, hidden=t.hidden,
            seed=init_seed(self.config.sharding, shard),
        )

    def _load_checkpoint(self, ref: FileRef) -> Checkpoint:
        data = self.store.read_bytes(ref.path)
        return Checkpoint.from_bytes(
            data, where=f"{self.store.location}/{ref.path}", expected_sha256=ref.sha256,
            expected_config_hash=self.config_hash,
        )

    def _read_table(self, ref: FileRef) -> pa.Table:
        raw = self.store.read_bytes(ref.path)
        if sha256(raw) != ref.sha256:
            raise StoreError(
                f"Shard data '{self.store.location}/{ref.path}' is corrupt: its SHA-256 does not "
                "match the manifest. Restore it from backup or retrain on a new --store."
            )
        return pq.read_table(pa.BufferReader(raw))

    def train(self, job: TrainJob | dict) -> dict:
        """Run a :class:`TrainJob`; return a :class:`TrainResult` as a dict.

        Idempotent: running a job twice writes the same bytes to the same paths, because Ray
        may retry a call after a failure.
        """
        self._last_call = time.monotonic()
        if isinstance(job, dict):
            job = TrainJob(**job)
        shard = job.shard
        t0 = time.perf_counter()
        sharding, training = self.config.sharding, self.config.training
        phases = dict.fromkeys(("data", "features", "setup", "compute", "checkpoint"), 0.0)
        out_dir = shard_dir(shard, job.version)
        if job.rows is not None:  # written here, by the worker that trains the shard
            table = job.rows
            data_ref = FileRef(job.data["path"], self.store.write_table(job.data["path"], table))
        else:
            table = self._read_table(FileRef(**job.data))
            data_ref = FileRef(**job.data)
        if job.remove_ids:
            # rows are dropped from the table itself, so cached features go with their sample
            keep = ~np.isin(table.column("id").to_numpy(),
                            np.asarray(job.remove_ids, dtype=np.int64))
            table = table.filter(pa.array(keep))
            path = f"{out_dir}/data.parquet"
            data_ref = FileRef(path, self.store.write_table(path, table))
        samples = SampleSet.from_arrow(table)
        features = samples.features
        phases["data"] = time.perf_counter() - t0
        if self.backbone is not None:
            features = cached_embedding(table, self.config.training.backbone)
            if features is None:
                features = self._features(samples.features)
                path = f"{out_dir}/data-features.parquet"
                data_ref = FileRef(path, self.store.write_table(
                    path, with_embedding(table, features, self.config.training.backbone)))
        phases["features"] = time.perf_counter() - t0 - phases["data"]
        t_setup = time.perf_counter()
        shard_of, slice_of = assign(samples.ids, sharding)
        if (shard_of != shard).any():
            raise StoreError(
                f"Shard data '{data_ref.path}' holds ids of other shards; the store mixes configs."
            )

        model = self._new_model(shard).to(self.device)
        optimizer = make_optimizer(model, training)
        checkpoints = [FileRef(**c) for c in job.base_checkpoints[: job.start_step]]
        if len(checkpoints) != job.start_step:
            raise ValueError(
                f"Restarting shard {shard} at step {job.start_step} needs {job.start_step} "
                f"base checkpoints; got {len(checkpoints)}."
            )
        if job.start_step > 0:
            base = self._load_checkpoint(checkpoints[-1])
            expected = ids_digest(samples.ids[slice_of <= job.start_step - 1])
            if base.ids_digest != expected:
                raise StoreError(
                    f"Shard {shard}: the checkpoint after step {job.start_step - 1} saw other "
                    "samples than the retained data holds, so it is not a clean restart point. "
                    "The store is inconsistent; run `sisa-ray verify` or retrain on a new --store."
                )
            model.load_state_dict(base.model_state)
            optimizer.load_state_dict(base.optimizer_state)

        total_steps = 0
        threads = (min(job.parallel, usable_cores(), training.micro_batches)
                   if training.micro_batches > 1 else training.threads)
        t_train = time.perf_counter()
        phases["setup"] = t_train - t_setup
        with deterministic_torch(training.threads):
            for res in train_steps(
                model, optimizer, features, samples.labels, samples.ids, slice_of,
                sharding=sharding, training=training, shard=shard,
                start_step=job.start_step, device=self.device, task=self.task,
                parallel=threads,
            ):
                total_steps += res.sample_steps
                t_ckpt = time.perf_counter()
                ckpt = Checkpoint(
                    shard=shard, step=res.step, config_hash=self.config_hash,
                    ids_digest=ids_digest(res.ids), n_samples=res.n_samples,
                    model_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                    optimizer_state=_cpu_state(optimizer.state_dict()),
                )
                blob = ckpt.to_bytes()
                ref = FileRef(f"{out_dir}/step_{res.step:03d}.pt", sha256(blob))
                self.store.write_bytes(ref.path, blob)
                checkpoints.append(ref)
                phases["checkpoint"] += time.perf_counter() - t_ckpt
        train_seconds = time.perf_counter() - t_train
        phases["compute"] = train_seconds - phases["checkpoint"]
        entry = ShardEntry(
            shard=shard, version=job.version, n_samples=len(samples),
            slice_counts=np.bincount(slice_of, minlength=sharding.n_slices).tolist(),
            data=data_ref, checkpoints=checkpoints,
        )
        log.debug("shard %d v%d trained from step %d", shard, job.version, job.start_step)
        return asdict(TrainResult(
            entry=entry.to_dict(), sample_steps=total_steps,
            seconds=time.perf_counter() - t0, train_seconds=train_seconds,
            start_step=job.start_step, phases=phases, threads=threads,
        ))


def _cpu_state(state):
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: _cpu_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu_state(v) for v in state)
    return state


def _release_free_memory() -> None:
    """Give the allocator's freed pages back to the system (glibc keeps them otherwise): a
    worker that just ran many models over a large batch should not sit on their activations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
