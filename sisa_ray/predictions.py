"""The predictions file ``sisa-ray predict`` writes: one row per input row, Parquet.

Columns
-------
``id``
    The input's ids, in input order.
``prediction``
    The class (int64) or, for regression, the mean or median of the shards' outputs (float64).
``vote_share``
    Hard vote only: the fraction of voting shards that picked each class (what the majority vote
    of Bourtoule et al., "Machine Unlearning", IEEE S&P 2021, Section V, decides on).
``proba``
    Classification: the mean class probability over the voting shards (the soft vote's input),
    under either vote rule.
``shard_proba``
    Only when asked for: each shard's probabilities (regression: its output) as float32, null
    for a shard that abstains (it has no training samples left).
``label``
    Carried through unchanged when the input has one.

The schema metadata key ``sisa_ray.predictions`` holds JSON naming the store, the generation of
the manifest the predictions came from, the config hash and the vote rule, so a file can be
traced to the exact models that made it (and be deleted or remade after a deletion).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from .core.aggregation import aggregate, aggregate_regression, soft_vote_proba

METADATA_KEY = b"sisa_ray.predictions"


def predictions_table(
    ids: pa.ChunkedArray | pa.Array,
    shard_outputs: np.ndarray,
    active: np.ndarray,
    *,
    task: str,
    vote: str,
    provenance: dict,
    label: pa.ChunkedArray | pa.Array | None = None,
    with_shard_proba: bool = False,
) -> pa.Table:
    """Aggregate the shards' outputs and lay them out as the predictions file.

    Parameters
    ----------
    ids : the input's ``id`` column.
    shard_outputs : shape (S, N, C): each shard's class probabilities (regression: C = 1).
    active : shape (S,): the shards that vote (the others abstain).
    task : ``"classification"`` or ``"regression"``.
    vote : ``"hard"`` or ``"soft"`` (classification), ``"mean"`` or ``"median"`` (regression).
    provenance : ``store``, ``generation`` and ``config_hash`` of the models used.
    label : the input's ``label`` column, carried through when given.
    with_shard_proba : add the per-shard ``shard_proba`` column.
    """
    missing = {"store", "generation", "config_hash"} - set(provenance)
    if missing:
        raise ValueError(f"provenance must name {sorted(missing)}; got keys {sorted(provenance)}.")
    columns: dict[str, pa.Array | pa.ChunkedArray] = {"id": ids}
    if task == "regression":
        if vote not in ("mean", "median"):
            raise ValueError(f"The 'vote' for regression must be 'mean' or 'median'. Got {vote!r}.")
        columns["prediction"] = pa.array(aggregate_regression(shard_outputs, active, vote))
    else:
        pred, agg = aggregate(shard_outputs, active, vote)
        columns["prediction"] = pa.array(pred.astype(np.int64))
        if vote == "hard":
            columns["vote_share"] = _rows(agg, pa.float64())
            agg = soft_vote_proba(shard_outputs, active)
        columns["proba"] = _rows(agg, pa.float64())
    if with_shard_proba:
        columns["shard_proba"] = _shard_rows(shard_outputs, active)
    if label is not None:
        columns["label"] = label
    meta = {**{k: provenance[k] for k in ("store", "generation", "config_hash")},
            "vote": vote, "task": task}
    table = pa.table(columns)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True)})


def read_provenance(table: pa.Table) -> dict:
    """The provenance a predictions file records (store, generation, config hash, vote, task)."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("This table has no sisa_ray.predictions metadata: it was not written by "
                         "`sisa-ray predict`.")
    return json.loads(raw)


def _rows(values: np.ndarray, kind: pa.DataType) -> pa.FixedSizeListArray:
    """An (N, C) array as N lists of C values, without a Python loop over rows."""
    values = np.ascontiguousarray(values)
    flat = pa.array(values.reshape(-1), type=kind)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def _shard_rows(shard_outputs: np.ndarray, active: np.ndarray) -> pa.ListArray:
    """Per row, one list per shard (null where the shard abstains), float32."""
    s, n, c = shard_outputs.shape
    per_row = np.ascontiguousarray(np.transpose(shard_outputs, (1, 0, 2)), dtype=np.float32)
    inner = _rows(per_row.reshape(n * s, c), pa.float32())
    mask = pa.array(np.tile(~np.asarray(active, dtype=bool), n))
    inner = pa.FixedSizeListArray.from_arrays(inner.flatten(), c, mask=mask)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * s)
    return pa.ListArray.from_arrays(offsets, inner)
