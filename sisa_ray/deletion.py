"""The deletion protocol: validate, acknowledge, retrain, swap, complete, collect.

1. **validate** (read-only): every id must be live in its shard or in the stored test split, or
   deleted earlier; unknown ids are an error and nothing changes. The files a retrain starts
   from are checked, and the workers of the affected shards are started, so a node that cannot
   honour the pinned runtime refuses here, before anything is recorded;
2. **acknowledge**: append the request to the ledger, durably;
3. **retrain** every affected shard from its last clean slice into new versioned files, and write
   the stored test split without the ids to a new versioned file (a test split trains nothing, so
   it is filtered, never retrained);
4. **swap** the manifest pointer (a compare-and-swap): the deletion is live, in the shards and the
   test split at once;
5. **complete**: append ``completed`` to the ledger (and checkpoint its state);
6. **collect** the files of the old versions, which hold models that saw the deleted samples (and
   the old test split, which holds the deleted rows).

A crash anywhere leaves the old or the new manifest; :func:`recover` (run by every writer before
it does anything else) finishes each acknowledged request that is not completed, in one batch,
and deletes again any id the ledger calls deleted that is live (a restored backup).

Everything here runs under the caller's writer lock (``lock``), which every durable write checks.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .core.config import SISAConfig
from .core.jobs import TrainJob
from .core.ledger import Ledger, Request
from .core.manifest import (
    TEST_DIR,
    FileRef,
    Manifest,
    ShardEntry,
    collect_garbage,
    read_manifest,
    write_manifest,
)
from .core.plan import DeletionPlan, assign, epochs_per_step, sample_steps
from .core.store import Store, StoreError, sha256

log = logging.getLogger(__name__)


@dataclass
class ShardRetrain:
    shard: int
    restart_slice: int
    deleted: int
    sample_steps: int
    seconds: float
    train_seconds: float = 0.0
    threads: int = 1  # the cores its retrain used (see TrainingConfig.micro_batches)


@dataclass
class UnlearnReport:
    """What a deletion request did."""

    request_id: str
    ids: list[int]
    deleted: list[int]
    already_deleted: list[int]
    shards: list[ShardRetrain]
    retrained_sample_steps: int
    full_retrain_sample_steps: int
    wall_seconds: float
    duplicate_request: bool = False
    batch: list[str] | None = None  # the requests retrained together with this one
    in_shards: list[int] = field(default_factory=list)  # found in the training data (retrained)
    in_test_split: list[int] = field(default_factory=list)  # found in the stored test split

    @property
    def sample_step_speedup(self) -> float | None:
        """Full-retrain sample-steps over retrained ones; None when nothing was retrained."""
        if self.retrained_sample_steps == 0:
            return None
        return self.full_retrain_sample_steps / self.retrained_sample_steps

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sample_step_speedup"] = self.sample_step_speedup
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UnlearnReport:
        d = {k: v for k, v in d.items() if k != "sample_step_speedup"}
        d["shards"] = [ShardRetrain(**s) for s in d["shards"]]
        return cls(**d)


MAX_ID = np.iinfo(np.int64).max


def validate_ids(ids) -> np.ndarray:
    """Parse a deletion request's ids: a non-empty collection of int64 integers."""
    if isinstance(ids, (str, bytes)) or np.ndim(ids) == 0:
        raise TypeError(
            f"ids must be a list of integer sample ids. Got {type(ids).__name__}: {ids!r}."
        )
    values = list(ids)
    if not values:
        raise ValueError("The deletion request is empty: give at least one sample id.")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
    if bad:
        raise TypeError(
            f"Sample ids must be integers. Got non-integer value(s): {bad[:10]}. "
            "Pass the int64 ids shown by `sisa-ray status` or your data's 'id' column."
        )
    # uint64 values >= 2**63 would wrap to negative int64 ids: refuse, never reinterpret
    out_of_range = [int(v) for v in values if not -MAX_ID - 1 <= int(v) <= MAX_ID]
    if out_of_range:
        raise ValueError(
            f"Sample ids must fit in int64 ([-2**63, 2**63-1]). Got {out_of_range[:10]}. "
            "Use the ids as stored in your data's 'id' column."
        )
    return np.unique(np.asarray([int(v) for v in values], dtype=np.int64))


LEGACY_TEST_DATA = "data/test.parquet"
"""Where stores written before the manifest named the test split keep it (read, then replaced
by a versioned file at their first deletion that reaches it)."""


def test_split_path(store: Store, manifest: Manifest) -> str | None:
    """The stored test split's path in ``store`` under ``manifest``; None when there is none."""
    if manifest.test is not None:
        return manifest.test.path
    return LEGACY_TEST_DATA if store.exists(LEGACY_TEST_DATA) else None


def read_test_split(store: Store, manifest: Manifest, columns: list[str] | None = None,
                    check: bool = False) -> pa.Table | None:
    """The stored test split as a table (None when there is none); ``check`` compares its SHA-256
    with the manifest's before a deletion builds on it."""
    rel = test_split_path(store, manifest)
    if rel is None:
        return None
    raw = store.read_bytes(rel)
    if check and manifest.test is not None and sha256(raw) != manifest.test.sha256:
        raise StoreError(
            f"'{store.location}/{rel}' (the stored test split) is corrupt: its SHA-256 does not "
            "match the manifest. Nothing was deleted. Restore the file from backup."
        )
    return pq.read_table(pa.BufferReader(raw), columns=columns)


def write_test_split_without(store: Store, manifest: Manifest, ids: np.ndarray,
                             generation: int) -> FileRef:
    """Write the stored test split less the rows of ``ids`` to a new versioned path (the live one
    is untouched until the manifest swap), keeping the schema and its metadata."""
    table = read_test_split(store, manifest, check=True)
    keep = pc.invert(pc.is_in(table.column("id"), value_set=pa.array(ids, type=pa.int64())))
    rel = f"{TEST_DIR}/g{generation:010d}-{uuid.uuid4().hex[:8]}.parquet"
    return FileRef(rel, store.write_table(rel, table.filter(keep)))


def default_request_id(ids: np.ndarray) -> str:
    return "req-" + hashlib.sha256(np.sort(ids).tobytes()).hexdigest()[:16]


class DeletionContext:
    """What a deletion works on: the store, its config, its ledger and the executor."""

    def __init__(self, store: Store, config: SISAConfig, executor, prepare,
                 ledger: Ledger | None = None) -> None:
        self.store, self.config, self.executor = store, config, executor
        self.ledger = ledger or Ledger(store)
        self.prepare = prepare  # prepare(shards): start/bind the workers of these shards

    def live_ids(self, manifest: Manifest, shard: int) -> np.ndarray:
        entry = manifest.shards[shard]
        table = self.store.read_table(entry.data.path, columns=["id"])
        return table.column("id").to_numpy().astype(np.int64)

    def locate(self, manifest: Manifest, ids: np.ndarray) -> np.ndarray:
        """Mask of ``ids`` that are live in the shard they hash to (reads only those shards)."""
        shard_of, _ = assign(ids, self.config.sharding)
        live = np.zeros(ids.size, dtype=bool)
        for s in np.unique(shard_of).tolist():
            sel = shard_of == s
            live[sel] = np.isin(ids[sel], self.live_ids(manifest, s))
        return live

    def in_test_split(self, manifest: Manifest, ids: np.ndarray) -> np.ndarray:
        """Mask of ``ids`` that are rows of the stored test split."""
        table = read_test_split(self.store, manifest, columns=["id"]) if ids.size else None
        if table is None:
            return np.zeros(ids.size, dtype=bool)
        return np.isin(ids, table.column("id").to_numpy().astype(np.int64))

    def held(self, manifest: Manifest, ids: np.ndarray) -> np.ndarray:
        """Mask of ``ids`` this store holds anywhere: training shards or stored test split."""
        return self.locate(manifest, ids) | self.in_test_split(manifest, ids)


def unlearn(ctx: DeletionContext, ids: np.ndarray, request_id: str | None, lock,
            progress=None) -> UnlearnReport:
    """Run the whole protocol for one request (see the module docstring)."""
    recover(ctx, lock, progress)
    rid = request_id or default_request_id(ids)
    state = ctx.ledger.state()
    if rid in state.requests:
        prev_ids = sorted(ctx.ledger.request_ids(rid))
        if prev_ids != ids.tolist():
            raise ValueError(
                f"Request id {rid!r} was already used for other ids ({len(prev_ids)} ids). "
                "Use a new request id for a new request."
            )
        prev = ctx.ledger.report(rid)
        if not prev:
            raise StoreError(f"Request {rid!r} is {state.requests[rid].status}; it was not applied.")
        report = UnlearnReport.from_dict(prev)
        report.duplicate_request = True
        return report
    manifest = read_manifest(ctx.store)
    live = ctx.locate(manifest, ids)
    in_test = ctx.in_test_split(manifest, ids)
    absent = ids[~(live | in_test)]
    unknown = absent[~np.isin(absent, np.fromiter(state.deleted, np.int64, len(state.deleted)))]
    if unknown.size:
        raise ValueError(
            f"{unknown.size} id(s) were never trained on in this store: {unknown[:20].tolist()}"
            f"{' ...' if unknown.size > 20 else ''}, nor are they in its stored test split. "
            "Nothing was deleted. Check the ids against your data's 'id' column and send the "
            "request again without them."
        )
    plan = DeletionPlan.build(ids[live], ctx.config.sharding)
    check_restart_points(ctx.store, manifest, plan)
    if in_test.any():
        read_test_split(ctx.store, manifest, columns=[], check=True)
    ctx.prepare(plan.shards)
    ack = ctx.ledger.acknowledge(rid, ids.tolist(), lock)
    return apply(ctx, [Request(rid, ack, ids=ids.tolist())], lock, progress)[0]


def check_restart_points(store: Store, manifest: Manifest, plan: DeletionPlan) -> None:
    """Check the files a deletion will start from, before acknowledging it."""
    for s, k in plan.restart_slice.items():
        entry = manifest.shards[s]
        for ref in [entry.data, *entry.checkpoints[:k]]:
            if sha256(store.read_bytes(ref.path)) != ref.sha256:
                raise StoreError(
                    f"'{store.location}/{ref.path}' is corrupt: its SHA-256 does not match the "
                    "manifest (truncated or altered). Nothing was deleted. Restore the file from "
                    "backup, or retrain on a new --store."
                )


def recover(ctx: DeletionContext, lock, progress=None) -> list[UnlearnReport]:
    """Finish every acknowledged request, delete again any deleted id that came back, and remove
    files no manifest references."""
    reports = []
    pending = ctx.ledger.pending()
    if pending:
        log.warning("finishing acknowledged deletion request(s) %s",
                    ", ".join(r.request_id for r in pending))
        reports = apply(ctx, pending, lock, progress)
    back = resurrected(ctx)
    if back.size:
        log.warning("ids %s are deleted in the ledger but live in the store (a restored "
                    "backup?); deleting them again", back[:20].tolist())
        rid = "reapply-" + default_request_id(back)[4:]
        ack = ctx.ledger.acknowledge(rid, back.tolist(), lock)
        reports += apply(ctx, [Request(rid, ack, ids=back.tolist())], lock, progress)
    manifest = read_manifest(ctx.store)
    if manifest.test is not None:  # a crash after the swap may have left the unversioned copy
        ctx.store.delete(LEGACY_TEST_DATA)
    collect_garbage(ctx.store, manifest)
    return reports


def resurrected(ctx: DeletionContext, manifest: Manifest | None = None,
                everything: bool = False) -> np.ndarray:
    """Ids the ledger calls deleted that are live in the store (its shards or its test split).

    A live manifest reflects every request acknowledged up to its ``applied_through``; only the
    ids of requests completed after that can have come back (a manifest and shards restored from
    a backup), so by default only those shards are read. ``everything`` checks every deleted id.
    """
    manifest = manifest or read_manifest(ctx.store)
    state = ctx.ledger.state()
    if everything:
        ids = np.fromiter(state.deleted, np.int64, len(state.deleted))
    else:
        later = [r.request_id for r in state.requests.values()
                 if r.status == "completed" and r.ack_seq > manifest.applied_through]
        ids = np.asarray(sorted({i for rid in later for i in ctx.ledger.request_ids(rid)}),
                         dtype=np.int64)
    if ids.size == 0:
        return ids
    return np.sort(ids[ctx.held(manifest, ids)])


def apply(ctx: DeletionContext, requests: list[Request], lock,
          progress=None) -> list[UnlearnReport]:
    """Retrain once for a batch of acknowledged requests, swap, complete each of them."""
    t0 = time.perf_counter()
    manifest = read_manifest(ctx.store)
    rids = [r.request_id for r in requests]
    ids_of = {r.request_id: np.asarray(sorted(r.ids), dtype=np.int64) for r in requests}
    done = []
    for r in requests:
        if r.ack_seq <= manifest.applied_through:
            # crashed after the swap, before the completion: this deletion is live already
            done.append(_report_without_retrain(r.request_id, ids_of[r.request_id]))
            ctx.ledger.complete(r.request_id, done[-1].to_dict(), lock)
    requests = [r for r in requests if r.ack_seq > manifest.applied_through]
    if not requests:
        return done
    rids = [r.request_id for r in requests]
    all_ids = np.unique(np.concatenate([ids_of[r.request_id] for r in requests]))
    to_delete = all_ids[ctx.locate(manifest, all_ids)]
    from_test = all_ids[ctx.in_test_split(manifest, all_ids)]
    plan = DeletionPlan.build(to_delete, ctx.config.sharding)
    check_restart_points(ctx.store, manifest, plan)
    shard_of, _ = assign(to_delete, ctx.config.sharding)
    jobs = []
    for s, k in plan.restart_slice.items():
        entry = manifest.shards[s]
        jobs.append(TrainJob(
            shard=s, version=entry.version + 1, data=entry.data.to_dict(), start_step=k,
            base_checkpoints=[c.to_dict() for c in entry.checkpoints[:k]],
            remove_ids=to_delete[shard_of == s].tolist(),
        ))
    # the costliest retrains first (a shard's samples times the steps it retrains), so the last
    # job to finish is a cheap one and the wall time is not one long job started last
    n_steps = ctx.config.sharding.n_slices
    jobs.sort(key=lambda j: -manifest.shards[j.shard].n_samples * (n_steps - j.start_step))
    ctx.prepare(plan.shards)
    results = ctx.executor.run_jobs(jobs, progress) if jobs else []
    new = manifest.copy()
    new.generation += 1
    new.applied_through = max(r.ack_seq for r in requests)
    new.token = lock.token
    for r in results:
        entry = ShardEntry.from_dict(r["entry"])
        new.shards[entry.shard] = entry
    if from_test.size:
        new.test = write_test_split_without(ctx.store, manifest, from_test, new.generation)
    epochs = epochs_per_step(ctx.config.training, ctx.config.sharding.n_slices)
    shards = [
        ShardRetrain(shard=j.shard, restart_slice=j.start_step, deleted=len(j.remove_ids),
                     sample_steps=r["sample_steps"], seconds=r["seconds"],
                     train_seconds=r["train_seconds"], threads=r.get("threads", 1))
        for j, r in sorted(zip(jobs, results), key=lambda jr: jr[0].shard)
    ]
    full = sum(sample_steps(np.asarray(e.slice_counts), epochs) for e in new.shards)
    write_manifest(ctx.store, new, lock)  # the deletion is live from here on
    if from_test.size:
        ctx.store.delete(LEGACY_TEST_DATA)  # a store from before versioned test splits
    wall = time.perf_counter() - t0
    reports = []
    for rid in rids:
        mine = ids_of[rid]
        found = np.isin(mine, to_delete) | np.isin(mine, from_test)
        reports.append(UnlearnReport(
            request_id=rid, ids=mine.tolist(), deleted=mine[found].tolist(),
            already_deleted=mine[~found].tolist(), shards=shards,
            retrained_sample_steps=sum(s.sample_steps for s in shards),
            full_retrain_sample_steps=full, wall_seconds=wall,
            batch=rids if len(rids) > 1 else None,
            in_shards=mine[np.isin(mine, to_delete)].tolist(),
            in_test_split=mine[np.isin(mine, from_test)].tolist(),
        ))
        ctx.ledger.complete(rid, reports[-1].to_dict(), lock)
    collect_garbage(ctx.store, new)
    return done + reports


def _report_without_retrain(rid: str, ids: np.ndarray) -> UnlearnReport:
    """Report of a request whose manifest swap landed before a crash: its ids are deleted;
    which shards it retrained is not recorded anywhere durable, so that part is empty."""
    return UnlearnReport(
        request_id=rid, ids=ids.tolist(), deleted=ids.tolist(), already_deleted=[],
        shards=[], retrained_sample_steps=0, full_retrain_sample_steps=0, wall_seconds=0.0,
    )
