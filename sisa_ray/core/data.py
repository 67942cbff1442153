"""Labelled samples with stable ids, validated once at the door.

Features are stored exactly as given: no statistics of the training set (means, variances) are
computed from the data, because a deletion would change them and break exactness. Built-in datasets
scale by a fixed constant (``/16`` for digits, ``/255`` for images) instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

TASKS = ("classification", "regression")


@dataclass(frozen=True, eq=False)
class SampleSet:
    """Samples with stable int64 ids.

    Parameters
    ----------
    ids : int64 array, shape (N,), unique
    features : float32 array, shape (N, *input_shape)
    labels : classification: int64 array, shape (N,), each in ``[0, n_classes)``;
        regression: float array, shape (N,), finite
    n_classes : number of model outputs: the classes (fixed by the original dataset, so a deletion
        that removes a whole class does not change the architecture), or 1 for regression
    name : where the samples came from, for reports
    task : ``"classification"`` or ``"regression"``
    """

    ids: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    n_classes: int
    name: str = "samples"
    task: str = "classification"

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        if ids.ndim != 1:
            raise ValueError(f"{self.name}: 'ids' must be one-dimensional. Got shape {ids.shape}.")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(
                f"{self.name}: 'ids' must be integers (int64). Got dtype {ids.dtype}. "
                "Give every sample a stable integer id."
            )
        ids = ids.astype(np.int64)
        uniq, counts = np.unique(ids, return_counts=True)
        if uniq.size != ids.size:
            dup = uniq[counts > 1][:10].tolist()
            raise ValueError(
                f"{self.name}: 'ids' must be unique. Duplicated ids (first 10): {dup}. "
                "Remove or renumber the duplicate rows."
            )
        feats = np.asarray(self.features)
        if feats.shape[:1] != ids.shape:
            raise ValueError(
                f"{self.name}: 'features' has {feats.shape[0] if feats.ndim else 0} rows but there "
                f"are {ids.size} ids. Give one feature row per id."
            )
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        if feats.size and not np.isfinite(feats).all():
            bad_rows = ids[~np.isfinite(feats.reshape(len(ids), -1)).all(axis=1)][:10].tolist()
            raise ValueError(
                f"{self.name}: 'features' contains NaN or infinite values (ids, first 10: "
                f"{bad_rows}). Impute or drop those rows before training."
            )
        if self.task not in TASKS:
            raise ValueError(f"{self.name}: 'task' must be one of {list(TASKS)}. "
                             f"Got {self.task!r}.")
        if isinstance(self.n_classes, bool) or not isinstance(self.n_classes, (int, np.integer)):
            raise TypeError(f"{self.name}: 'n_classes' must be an int. Got {self.n_classes!r}.")
        labels = np.asarray(self.labels)
        if labels.shape != ids.shape:
            raise ValueError(
                f"{self.name}: 'labels' has shape {labels.shape}; expected ({ids.size},)."
            )
        if self.task == "regression":
            if self.n_classes != 1:
                raise ValueError(f"{self.name}: regression has one output; 'n_classes' must be "
                                 f"1. Got {self.n_classes}.")
            if labels.size and not np.issubdtype(labels.dtype, np.number):
                raise TypeError(f"{self.name}: regression labels must be numbers. Got dtype "
                                f"{labels.dtype}.")
            labels = labels.astype(np.float32)
            if not np.isfinite(labels).all():
                raise ValueError(f"{self.name}: regression labels contain NaN or infinity (ids "
                                 f"{ids[~np.isfinite(labels)][:10].tolist()}). Drop those rows.")
            object.__setattr__(self, "ids", ids)
            object.__setattr__(self, "features", feats)
            object.__setattr__(self, "labels", labels)
            object.__setattr__(self, "n_classes", 1)
            return
        if self.n_classes < 2:
            raise ValueError(f"{self.name}: 'n_classes' must be >= 2. Got {self.n_classes}.")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(
                f"{self.name}: 'labels' must be integer class indices. Got dtype {labels.dtype}."
            )
        labels = labels.astype(np.int64)
        out = (labels < 0) | (labels >= self.n_classes)
        if out.any():
            raise ValueError(
                f"{self.name}: labels must lie in [0, {self.n_classes}). Got "
                f"{sorted(set(labels[out].tolist()))[:10]} (ids {ids[out][:10].tolist()}). "
                "Map labels to 0..n_classes-1 or raise n_classes."
            )
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "features", feats)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "n_classes", int(self.n_classes))

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.features.shape[1:])

    def take(self, index: np.ndarray) -> SampleSet:
        """Rows at ``index`` (positions or a boolean mask), same metadata."""
        return SampleSet(
            ids=self.ids[index],
            features=self.features[index],
            labels=self.labels[index],
            n_classes=self.n_classes,
            name=self.name,
            task=self.task,
        )

    def select_ids(self, ids: np.ndarray) -> SampleSet:
        """Rows whose id is in ``ids``, in this set's row order."""
        return self.take(np.isin(self.ids, np.asarray(ids, dtype=np.int64)))

    def without_ids(self, ids: np.ndarray) -> SampleSet:
        return self.take(~np.isin(self.ids, np.asarray(ids, dtype=np.int64)))

    def fingerprint(self) -> str:
        """Digest of ids, labels, features, shape and classes, independent of row order and of
        how the rows are split into parts (see :func:`fingerprint_of`)."""
        return fingerprint_of(row_digest_sum(self.ids, self.labels, self.features),
                              self.input_shape, self.n_classes, self.task)

    # -- Arrow / Parquet form: columns id int64, label int64, features list<float32> ---------------

    def to_arrow(self) -> pa.Table:
        width = int(np.prod(self.input_shape))
        values = pa.array(self.features.reshape(-1), type=pa.float32())
        feats = pa.FixedSizeListArray.from_arrays(values, width)
        meta = {
            b"sisa_ray.n_classes": str(self.n_classes).encode(),
            b"sisa_ray.input_shape": ",".join(map(str, self.input_shape)).encode(),
            b"sisa_ray.name": self.name.encode(),
            b"sisa_ray.task": self.task.encode(),
        }
        label_type = pa.float64() if self.task == "regression" else pa.int64()
        table = pa.table(
            {"id": pa.array(self.ids, pa.int64()), "label": pa.array(self.labels, label_type),
             "features": feats}
        )
        return table.replace_schema_metadata(meta)

    @classmethod
    def from_arrow(cls, table: pa.Table) -> SampleSet:
        """Inverse of :meth:`to_arrow` for tables this package wrote (metadata present)."""
        meta = table.schema.metadata or {}
        shape = tuple(int(d) for d in meta[b"sisa_ray.input_shape"].decode().split(",") if d)
        n = table.num_rows
        feats_col = table.column("features").combine_chunks()
        flat = np.asarray(feats_col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        task = meta.get(b"sisa_ray.task", b"classification").decode()
        labels = table.column("label").to_numpy()
        return cls(
            ids=table.column("id").to_numpy().astype(np.int64),
            features=flat.reshape((n, *shape)),
            labels=labels.astype(np.float32 if task == "regression" else np.int64),
            n_classes=int(meta[b"sisa_ray.n_classes"].decode()),
            name=meta.get(b"sisa_ray.name", b"samples").decode(),
            task=task,
        )


def row_digest_sum(ids: np.ndarray, labels: np.ndarray, features: np.ndarray) -> int:
    """The sum, modulo 2**256, of a SHA-256 digest of every row (id, label, feature bytes).

    A sum is order-independent and adds up across parts, so parallel tasks that each see a part
    of a dataset yield the same fingerprint as one pass over all of it."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    feats = np.ascontiguousarray(features, dtype=np.float32).reshape(len(ids), -1)
    labs = np.ascontiguousarray(labels)
    labs = labs.astype(np.float32 if np.issubdtype(labs.dtype, np.floating) else np.int64)
    total = 0
    for i in range(len(ids)):
        h = hashlib.sha256(ids[i].tobytes())
        h.update(labs[i].tobytes())
        h.update(feats[i].tobytes())
        total += int.from_bytes(h.digest(), "little")
    return total % (1 << 256)


def fingerprint_of(digest_sum: int, input_shape, n_classes: int, task: str) -> str:
    h = hashlib.sha256(repr((tuple(int(d) for d in input_shape), int(n_classes), task)).encode())
    h.update(int(digest_sum % (1 << 256)).to_bytes(32, "little"))
    return h.hexdigest()[:16]
