"""Sharding Parquet data in parallel tasks: the same store, bit for bit, as from memory."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sisa_ray.core.checkpoint import states_identical
from sisa_ray.datasets import read_parquet, write_parquet
from sisa_ray.ensemble import SISAEnsemble
from sisa_ray.ingest import ParquetSource


def _write_parts(samples, directory, n_files=3, row_group_size=40):
    directory.mkdir()
    order = np.random.default_rng(1).permutation(len(samples))  # rows in any order
    for i, part in enumerate(np.array_split(order, n_files)):
        sub = samples.take(np.sort(part))
        flat = sub.features.reshape(len(sub), -1)
        table = pa.table({"id": pa.array(sub.ids, pa.int64()),
                          "label": pa.array(sub.labels, pa.int64()),
                          "features": pa.array(list(flat), type=pa.list_(pa.float32()))})
        pq.write_table(table, str(directory / f"part-{i}.parquet"), row_group_size=row_group_size)


def _same_states(a, b):
    for x, y in zip(a.shard_states(all_steps=True), b.shard_states(all_steps=True)):
        assert all(states_identical(p, q) == [] for p, q in zip(x, y))


def test_parquet_directory_trains_the_same_store_as_memory(tiny, tiny_config, tmp_path):
    train, test = tiny
    write_parquet(train, str(tmp_path / "all.parquet"))
    flat = read_parquet(str(tmp_path / "all.parquet"))
    _write_parts(flat, tmp_path / "parts")
    source = ParquetSource(str(tmp_path / "parts"), n_classes=10, name="digits")
    assert len(source.parts()) > 3  # several files, several row groups each
    streamed = SISAEnsemble(tiny_config, store=str(tmp_path / "a"), backend="local").fit(source)
    memory = SISAEnsemble(tiny_config, store=str(tmp_path / "b"), backend="local").fit(flat)
    assert streamed.meta_["dataset"]["fingerprint"] == memory.meta_["dataset"]["fingerprint"]
    assert streamed.config_.config_hash() == memory.config_.config_hash()
    assert streamed.status()["n_train_live"] == len(train)
    _same_states(streamed, memory)
    assert not list((tmp_path / "a").glob("staging/**/*.parquet"))
    # a second fit of the same data on the same store resumes (here: is already done)
    again = SISAEnsemble(tiny_config, store=str(tmp_path / "a"), backend="local").fit(source)
    assert again.manifest_.generation == 1


@pytest.mark.ray
def test_parquet_is_sharded_by_ray_tasks(tiny, tiny_config, tmp_path, ray_session):
    train, _ = tiny
    write_parquet(train, str(tmp_path / "all.parquet"))
    flat = read_parquet(str(tmp_path / "all.parquet"))
    _write_parts(flat, tmp_path / "parts", n_files=2)
    ens = SISAEnsemble(tiny_config, store=str(tmp_path / "a"), backend="ray").fit(
        ParquetSource(str(tmp_path / "parts"), n_classes=10))
    try:
        memory = SISAEnsemble(tiny_config, store=str(tmp_path / "b"), backend="local").fit(flat)
        _same_states(ens, memory)
    finally:
        ens.close()


def test_duplicate_ids_across_files_are_named_and_the_store_stays_reusable(tiny, tiny_config,
                                                                          tmp_path):
    train, _ = tiny
    write_parquet(train, str(tmp_path / "all.parquet"))
    flat = read_parquet(str(tmp_path / "all.parquet"))
    d = tmp_path / "dup"
    d.mkdir()
    write_parquet(flat.take(np.arange(0, 100)), str(d / "a.parquet"))
    write_parquet(flat.take(np.arange(90, 200)), str(d / "b.parquet"))
    store = str(tmp_path / "s")
    with pytest.raises(ValueError, match=r"'ids' must be unique. Duplicated ids"):
        SISAEnsemble(tiny_config, store=store, backend="local").fit(ParquetSource(str(d)))
    (d / "b.parquet").unlink()
    ens = SISAEnsemble(tiny_config, store=store, backend="local").fit(ParquetSource(str(d)))
    assert ens.status()["n_train_live"] == 100


def test_missing_parquet_source_is_named(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SISAEnsemble(tiny_config, store=str(tmp_path / "s"), backend="local").fit(
            ParquetSource(str(tmp_path / "nope")))
