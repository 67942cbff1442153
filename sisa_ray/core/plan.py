"""Where every sample lives, in what order it is seen, and what a deletion must retrain.

Everything here is a pure function of sample ids and seeds (the exactness invariant, rules 1 and 2):

* a sample's shard and slice are a keyed hash of ``(id, seed, n_shards, n_slices)``;
* the order of samples in epoch ``e`` of slice step ``r`` of shard ``s`` is the order of a keyed hash
  of ``(id, seed, s, r, e)``, so removing one sample never reorders the others.

The hash is SplitMix64's finaliser keyed by a ``numpy.random.SeedSequence``; it only needs to be
stable across platforms and well spread, not cryptographic.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .config import ShardingConfig, TrainingConfig

_ASSIGN_TAG = 0x5151
_ORDER_TAG = 0x0DE5
_GROUP_TAG = 0x6A0B

# recorded placements by digest: content-addressed, so an entry never changes once added
_PLACEMENTS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64, copy=True)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def ids_digest(ids: np.ndarray) -> str:
    """Order-independent digest of a set of sample ids."""
    return hashlib.sha256(np.sort(np.asarray(ids, dtype=np.int64)).tobytes()).hexdigest()[:16]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integer parts, e.g. ``(seed, shard, step, epoch)``."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def keyed_hash(ids: np.ndarray, *key_parts: int) -> np.ndarray:
    """Hash int64 ids under a key derived from ``key_parts``. Returns uint64."""
    state = np.random.SeedSequence([int(p) for p in key_parts]).generate_state(2, dtype=np.uint64)
    x = np.asarray(ids, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(x + state[0])
        return _mix64(h ^ state[1])


def assign(ids: np.ndarray, sharding: ShardingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(shard, slice)`` arrays (int64) for the given sample ids.

    With a deletion-aware placement the shard of an id comes from the recorded placement table
    (see :func:`placement_shards`); an id the table does not hold (one that was never trained
    on) gets its hashed shard, where it is then found missing.
    """
    h = keyed_hash(ids, _ASSIGN_TAG, sharding.seed, sharding.n_shards, sharding.n_slices)
    n_shards = np.uint64(sharding.n_shards)
    shard = (h % n_shards).astype(np.int64)
    slice_ = ((h // n_shards) % np.uint64(sharding.n_slices)).astype(np.int64)
    if sharding.placement != "hash":
        table_ids, table_shard = recorded_placement(sharding)
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(table_ids, ids), max(table_ids.size - 1, 0))
        known = table_ids[pos] == ids if table_ids.size else np.zeros(ids.size, dtype=bool)
        shard = np.where(known, table_shard[pos] if table_ids.size else shard, shard)
    return shard, slice_


def placement_shards(ids: np.ndarray, column: np.ndarray, sharding: ShardingConfig) -> np.ndarray:
    """Deletion-aware shard of each sample, a pure function of its id and its column value.

    Bourtoule et al. (2021), Section VI: when some samples are more likely to be deleted than
    others, putting them in few shards means fewer shards retrain per request. With
    ``placement="prior"``, ``column`` is each sample's deletion probability: samples with
    ``prior >= hot_prior`` hash into shards ``0..hot_shards-1``, the others into
    ``hot_shards..n_shards-1``. With ``placement="group"``, ``column`` is an int64 group key
    (e.g. a user) and a group's samples all go to the shard its key hashes to, so deleting a
    group retrains one shard. Slices stay the keyed hash of the id.
    """
    ids = np.asarray(ids, dtype=np.int64)
    s = sharding.n_shards
    if sharding.placement == "group":
        h = keyed_hash(np.asarray(column, dtype=np.int64), _GROUP_TAG, sharding.seed, s)
        return (h % np.uint64(s)).astype(np.int64)
    if sharding.placement != "prior":
        raise ValueError(
            "The 'placement' parameter of ShardingConfig must be 'prior' or 'group' for a "
            f"deletion-aware placement. Got {sharding.placement!r} instead."
        )
    h = keyed_hash(ids, _ASSIGN_TAG, sharding.seed, s, sharding.n_slices)
    hot_n, cold_n = np.uint64(sharding.hot_shards), np.uint64(s - sharding.hot_shards)
    hot = np.asarray(column, dtype=np.float64) >= sharding.hot_prior
    return np.where(hot, h % hot_n, sharding.hot_shards + h % cold_n).astype(np.int64)


def with_placement(sharding: ShardingConfig, ids: np.ndarray, column: np.ndarray) -> ShardingConfig:
    """``sharding`` with its deletion-aware placement computed from each sample's column value
    (see :func:`placement_shards`), recorded and named by ``placement_digest``."""
    ids = np.asarray(ids, dtype=np.int64)
    column = np.asarray(column)
    if column.shape != ids.shape:
        raise ValueError(
            f"The placement column has shape {column.shape}; expected one value per id "
            f"({ids.size},). Give a 'deletion_prior' or 'group' value for every sample."
        )
    if sharding.placement == "prior" and column.size and not (
            np.issubdtype(column.dtype, np.number) and np.isfinite(column).all()
            and column.min() >= 0.0 and column.max() <= 1.0):
        raise ValueError(
            "The 'deletion_prior' column must hold probabilities in [0, 1]. Got values outside "
            "that range (or NaN). Fix the column or drop it to shard by hash."
        )
    if sharding.placement == "group" and column.size and not np.issubdtype(column.dtype,
                                                                           np.integer):
        raise TypeError(
            f"The 'group' column must hold integer group keys. Got dtype {column.dtype}. Map "
            "group names to integers first."
        )
    digest = register_placement(ids, placement_shards(ids, column, sharding))
    return dataclasses.replace(sharding, placement_digest=digest)


def register_placement(ids: np.ndarray, shard: np.ndarray) -> str:
    """Record a placement table (id -> shard) in this process; return its digest, the value of
    ``ShardingConfig.placement_digest`` that selects it."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    ids, shard = ids[order], np.asarray(shard, dtype=np.int64)[order]
    digest = hashlib.sha256(ids.tobytes() + shard.tobytes()).hexdigest()[:16]
    _PLACEMENTS.setdefault(digest, (ids, shard))
    return digest


PLACEMENT_FILE = "placement.parquet"


def placement_table(sharding: ShardingConfig) -> pa.Table:
    """The recorded placement as a table (``id``, ``shard``), to keep in the store."""
    ids, shard = recorded_placement(sharding)
    return pa.table({"id": pa.array(ids, pa.int64()), "shard": pa.array(shard, pa.int64())})


def load_placement(table: pa.Table, sharding: ShardingConfig) -> None:
    """Register a placement table read from a store, refusing one that is not the recorded one."""
    digest = register_placement(table.column("id").to_numpy(), table.column("shard").to_numpy())
    if digest != sharding.placement_digest:
        raise ValueError(
            f"The placement table has digest {digest}, but the config records "
            f"{sharding.placement_digest}: the store's {PLACEMENT_FILE} was altered. Restore it "
            "from backup or retrain on a new --store."
        )


def recorded_placement(sharding: ShardingConfig) -> tuple[np.ndarray, np.ndarray]:
    """The placement table ``(sorted ids, shard)`` that ``sharding.placement_digest`` names."""
    table = _PLACEMENTS.get(sharding.placement_digest or "")
    if table is None:
        raise ValueError(
            f"ShardingConfig(placement={sharding.placement!r}) needs its recorded placement "
            f"table (placement_digest={sharding.placement_digest!r}), which is not loaded. "
            "Fit on data with a 'deletion_prior' or 'group' column, or open the store that "
            "records it (SISAEnsemble.open)."
        )
    return table


def training_order(ids: np.ndarray, seed: int, shard: int, step: int, epoch: int) -> np.ndarray:
    """Indices that put ``ids`` in the order they are seen in one epoch of one slice step."""
    ids = np.asarray(ids, dtype=np.int64)
    h = keyed_hash(ids, _ORDER_TAG, seed, shard, step, epoch)
    # lexsort's last key is primary; the id breaks (astronomically unlikely) hash ties.
    return np.lexsort((ids, h))


def epochs_per_step(training: TrainingConfig, n_slices: int) -> tuple[int, ...]:
    """Epochs run at each slice step.

    ``"sisa"`` (default, Bourtoule et al. 2021, Section V): step ``r`` trains on slices ``0..r``,
    i.e. ``(r+1)/R`` of the shard, so ``e' = 2E/(R+1)`` epochs per step make the shard's total cost
    ``sum_r (r+1)/R * e' = E`` passes over the shard, the same as training it unsliced for ``E``
    epochs. ``e'`` is rarely an integer; step ``r`` runs
    ``max(1, round((r+1)*e') - round(r*e'))`` epochs so the cumulative count tracks the ideal and
    every step trains at least once.

    ``"per_slice"``: ``E`` epochs at every step (more accurate, ``(R+1)/2`` times the cost).
    """
    epochs, r_total = training.epochs, n_slices
    if training.epoch_schedule == "per_slice":
        return tuple([epochs] * r_total)
    ideal = 2.0 * epochs / (r_total + 1)
    out = []
    for r in range(r_total):
        out.append(max(1, int(round((r + 1) * ideal)) - int(round(r * ideal))))
    return tuple(out)


def sample_steps(slice_counts: np.ndarray, epochs: tuple[int, ...], from_step: int = 0) -> int:
    """Sample-gradient evaluations to train steps ``from_step..R-1`` of a shard.

    ``slice_counts[k]`` is the number of samples in slice ``k``; step ``r`` sees slices ``0..r``.
    """
    cumulative = np.cumsum(np.asarray(slice_counts, dtype=np.int64))
    return int(sum(int(cumulative[r]) * epochs[r] for r in range(from_step, len(epochs))))


@dataclass(frozen=True)
class ShardPlan:
    """The shard and slice of every training id."""

    ids: np.ndarray
    shard: np.ndarray
    slice_: np.ndarray
    n_shards: int
    n_slices: int

    @classmethod
    def build(cls, ids: np.ndarray, sharding: ShardingConfig) -> ShardPlan:
        ids = np.asarray(ids, dtype=np.int64)
        shard, slice_ = assign(ids, sharding)
        return cls(ids, shard, slice_, sharding.n_shards, sharding.n_slices)

    def shard_ids(self, shard: int) -> np.ndarray:
        return self.ids[self.shard == shard]

    def slice_counts(self, shard: int) -> np.ndarray:
        mask = self.shard == shard
        return np.bincount(self.slice_[mask], minlength=self.n_slices)

    def shard_sizes(self) -> np.ndarray:
        return np.bincount(self.shard, minlength=self.n_shards)


@dataclass(frozen=True)
class DeletionPlan:
    """Which shards a deletion touches and the slice step each must restart from.

    ``restart_slice[s]`` is the first slice of shard ``s`` holding a deleted id; the checkpoint taken
    after step ``restart_slice[s] - 1`` (the last clean slice) is the starting point, or a fresh
    initialisation when it is 0.
    """

    restart_slice: dict[int, int]

    @classmethod
    def build(cls, delete_ids: np.ndarray, sharding: ShardingConfig) -> DeletionPlan:
        shard, slice_ = assign(np.asarray(delete_ids, dtype=np.int64), sharding)
        restart: dict[int, int] = {}
        for s, k in zip(shard.tolist(), slice_.tolist()):
            restart[s] = min(k, restart.get(s, k))
        return cls(dict(sorted(restart.items())))

    @property
    def shards(self) -> list[int]:
        return list(self.restart_slice)
