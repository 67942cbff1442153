"""Sharding a Parquet dataset without loading it in the driver.

Two rounds of independent tasks (Ray tasks on a cluster, plain calls in-process):

1. :func:`partition_part`: each task reads one row group of the input, checks its rows exactly
   as :func:`~sisa_ray.datasets.read_parquet` does, assigns every row to its shard (the keyed hash
   of its id) and writes one staging file per shard it found. It returns counts and the part's
   share of the data fingerprint (a sum of row digests, so parts add up in any order).
2. :func:`assemble_shard`: each task gathers its shard's staging files, checks the ids are unique
   (a duplicated id always hashes to the same shard, so duplicates across parts meet here) and
   writes the shard's data file.

The driver only adds up small dicts, so its memory does not grow with the dataset.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .core.config import ShardingConfig
from .core.data import SampleSet, fingerprint_of, row_digest_sum
from .core.manifest import STAGING_DIR, FileRef, shard_dir
from .core.plan import assign
from .core.store import Store

__all__ = ["STAGING_DIR", "ParquetSource", "assemble_shard", "combine", "partition_part"]


@dataclass(frozen=True)
class ParquetSource:
    """Training data in Parquet (a file, or a directory of files; a local path or a
    ``pyarrow.fs`` URI) with columns ``id``, ``label`` and ``features``.

    ``n_classes`` fixes the number of classes; without it, the largest label present + 1.
    """

    uri: str
    n_classes: int | None = None
    name: str | None = None

    def _fs(self) -> tuple[pafs.FileSystem, str]:
        if "://" in self.uri:
            return pafs.FileSystem.from_uri(self.uri)
        return pafs.LocalFileSystem(), posixpath.abspath(self.uri)

    @property
    def label(self) -> str:
        return self.name or posixpath.splitext(posixpath.basename(self.uri.rstrip("/")))[0]

    def parts(self) -> list[tuple[str, int]]:
        """``(file, row group)`` of every row group of the input: the units of work."""
        import pyarrow.dataset as pads  # pulls in pandas: only when sharding Parquet

        fs, path = self._fs()
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"Parquet data {self.uri} does not exist.")
        try:
            dataset = pads.dataset(path, filesystem=fs, format="parquet")
            out = []
            for frag in dataset.get_fragments():
                n_groups = frag.metadata.num_row_groups
                out += [(frag.path, g) for g in range(n_groups)]
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{self.uri} is not a readable Parquet dataset ({e}).") from e
        if not out:
            raise ValueError(f"{self.uri} holds no Parquet rows; give a file with training data.")
        return out

    def read_part(self, file: str, row_group: int) -> pa.Table:
        fs, _ = self._fs()
        with fs.open_input_file(file) as f:
            return pq.ParquetFile(f).read_row_group(row_group)


def staging_path(staging: str, shard: int, part: int) -> str:
    return f"{STAGING_DIR}/{staging}/s{shard:06d}/p{part:06d}.parquet"


def partition_part(source: ParquetSource, file: str, row_group: int, part: int,
                   sharding: dict, store_uri: str, staging: str) -> dict:
    """Round 1: one row group -> per-shard staging files; returns counts and digests."""
    from .datasets import samples_from_table

    where = f"{file} (row group {row_group})"
    samples = samples_from_table(source.read_part(file, row_group), where, source.n_classes,
                                 source.label)
    store = Store(store_uri)
    shard_of, _ = assign(samples.ids, ShardingConfig(**sharding))
    counts = {}
    for s in np.unique(shard_of).tolist():
        store.write_table(staging_path(staging, s, part), samples.take(shard_of == s).to_arrow())
        counts[int(s)] = int((shard_of == s).sum())
    return {
        "rows": len(samples), "shards": counts, "task": samples.task,
        "input_shape": list(samples.input_shape),
        "max_label": None if samples.task == "regression" or not len(samples)
        else int(samples.labels.max()),
        "digest_sum": row_digest_sum(samples.ids, samples.labels, samples.features),
        "where": where,
    }


def assemble_shard(store_uri: str, staging: str, shard: int, version: int, n_classes: int,
                   input_shape: list[int], task: str, name: str) -> dict:
    """Round 2: a shard's staging files -> its data file; returns the file's reference."""
    store = Store(store_uri)
    parts = store.list(f"{STAGING_DIR}/{staging}/s{shard:06d}")
    tables = [store.read_table(rel) for rel in parts]
    width = int(np.prod(input_shape))
    if tables:
        t = pa.concat_tables([tb.replace_schema_metadata(None) for tb in tables])
        ids = t.column("id").to_numpy().astype(np.int64)
        feats = np.asarray(t.column("features").combine_chunks().flatten()
                           .to_numpy(zero_copy_only=False), dtype=np.float32)
        labels = t.column("label").to_numpy()
    else:
        ids, feats, labels = (np.zeros(0, np.int64), np.zeros(0, np.float32),
                              np.zeros(0, np.float32 if task == "regression" else np.int64))
    samples = SampleSet(ids=ids, features=feats.reshape((len(ids), *input_shape))
                        if width else feats.reshape(len(ids), 0),
                        labels=labels, n_classes=n_classes, name=name, task=task)
    rel = f"{shard_dir(shard, version)}/data.parquet"
    ref = FileRef(rel, store.write_table(rel, samples.to_arrow()))
    for p in parts:
        store.delete(p)
    return {"shard": shard, "data": ref.to_dict(), "n_samples": len(samples)}


def combine(results: list[dict], source: ParquetSource) -> dict:
    """The dataset as the partition round saw it: rows, classes, shape, task, fingerprint."""
    shapes = {tuple(r["input_shape"]) for r in results if r["rows"]}
    if len(shapes) > 1:
        by = {tuple(r["input_shape"]): r["where"] for r in results if r["rows"]}
        raise ValueError(
            f"{source.uri}: parts have different feature widths: "
            + "; ".join(f"{w} in {where}" for w, where in by.items())
            + ". Every row must have the same number of features."
        )
    tasks = {r["task"] for r in results if r["rows"]}
    if len(tasks) > 1:
        raise ValueError(f"{source.uri}: some parts have integer labels, some float labels.")
    task = tasks.pop() if tasks else "classification"
    shape = shapes.pop() if shapes else (0,)
    if task == "regression":
        n_classes = 1
    elif source.n_classes is not None:
        n_classes = source.n_classes
    else:
        n_classes = max(2, 1 + max((r["max_label"] for r in results
                                    if r["max_label"] is not None), default=1))
    total = sum(int(r["digest_sum"]) for r in results)
    return {
        "rows": sum(r["rows"] for r in results), "task": task, "input_shape": shape,
        "n_classes": n_classes, "fingerprint": fingerprint_of(total, shape, n_classes, task),
    }
