"""The predictions file: vote shares named as such, optional float32 shard outputs, provenance in
the schema metadata, the input's label carried through."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sisa_ray.cli import main
from sisa_ray.datasets import write_parquet
from sisa_ray.ensemble import SISAEnsemble
from sisa_ray.predictions import METADATA_KEY, predictions_table, read_provenance

PROV = {"store": "/s", "generation": 4, "config_hash": "abc"}

# 3 shards, 2 rows, 3 classes; shard 2 abstains
OUTPUTS = np.array([
    [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]],
    [[0.1, 0.2, 0.7], [0.1, 0.1, 0.8]],
    [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]],
])
ACTIVE = np.array([True, True, False])


def test_hard_vote_writes_vote_shares_and_mean_probabilities():
    t = predictions_table(pa.array([10, 11]), OUTPUTS, ACTIVE, task="classification",
                          vote="hard", provenance=PROV)
    assert t.column_names == ["id", "prediction", "vote_share", "proba"]
    # row 0: votes for classes 0 and 2, a tie: the smallest class wins; row 1: classes 1 and 2
    assert t.column("prediction").to_pylist() == [0, 1]
    assert t.column("vote_share").to_pylist() == [[0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]
    np.testing.assert_allclose(t.column("proba").to_pylist(),
                               [[0.35, 0.25, 0.4], [0.15, 0.3, 0.55]])
    assert read_provenance(t) == {**PROV, "vote": "hard", "task": "classification"}


def test_soft_vote_has_no_vote_shares():
    t = predictions_table(pa.array([10, 11]), OUTPUTS, ACTIVE, task="classification",
                          vote="soft", provenance=PROV)
    assert t.column_names == ["id", "prediction", "proba"]
    assert t.column("prediction").to_pylist() == [2, 2]
    assert json.loads(t.schema.metadata[METADATA_KEY])["vote"] == "soft"


def test_shard_proba_is_float32_with_null_for_an_abstaining_shard():
    t = predictions_table(pa.array([10, 11]), OUTPUTS, ACTIVE, task="classification",
                          vote="hard", provenance=PROV, with_shard_proba=True)
    col = t.column("shard_proba")
    assert col.type.value_type.value_type == pa.float32()
    rows = col.to_pylist()
    assert [len(r) for r in rows] == [3, 3] and rows[0][2] is None and rows[1][2] is None
    np.testing.assert_array_equal(np.array(rows[1][:2], dtype=np.float32),
                                  OUTPUTS[:2, 1].astype(np.float32))
    np.testing.assert_array_equal(np.array(rows[0][:2], dtype=np.float32),
                                  OUTPUTS[:2, 0].astype(np.float32))


def test_regression_mean_and_median_and_label_carried_through():
    out = np.array([[[1.0], [4.0]], [[3.0], [0.0]], [[8.0], [5.0]]])
    active = np.ones(3, dtype=bool)
    label = pa.array([2.5, 3.5])
    mean = predictions_table(pa.array([1, 2]), out, active, task="regression", vote="mean",
                             provenance=PROV, label=label)
    median = predictions_table(pa.array([1, 2]), out, active, task="regression", vote="median",
                               provenance=PROV)
    assert mean.column_names == ["id", "prediction", "label"]
    assert mean.column("prediction").to_pylist() == [4.0, 3.0]
    assert median.column("prediction").to_pylist() == [3.0, 4.0]
    assert mean.column("label").to_pylist() == [2.5, 3.5]


def test_missing_provenance_is_refused():
    with pytest.raises(ValueError, match=r"provenance must name \['generation'\]"):
        predictions_table(pa.array([1]), OUTPUTS[:, :1], ACTIVE, task="classification",
                          vote="hard", provenance={"store": "/s", "config_hash": "x"})


def test_cli_predict_file(tiny, tiny_config, tmp_path, capsys):
    train, test = tiny
    store = str(tmp_path / "s")
    ens = SISAEnsemble(tiny_config, store=store, backend="local").fit(train, test)
    x_path, out_path = tmp_path / "X.parquet", tmp_path / "pred.parquet"
    write_parquet(test, str(x_path))
    common = ["--store", store, "--backend", "local", "--json"]

    assert main(["predict", *common, "--input", str(x_path), "--output", str(out_path)]) == 0
    capsys.readouterr()
    t = pq.read_table(out_path)
    assert t.column_names == ["id", "prediction", "vote_share", "proba", "label"]
    probs, active = ens.shard_proba(test.features)
    counts = np.zeros((len(test), 10))
    for s in np.flatnonzero(active):
        counts[np.arange(len(test)), probs[s].argmax(1)] += 1
    np.testing.assert_array_equal(np.array(t.column("vote_share").to_pylist()),
                                  counts / active.sum())
    np.testing.assert_array_equal(t.column("label").to_numpy(), test.labels)
    np.testing.assert_array_equal(t.column("id").to_numpy(), test.ids)
    prov = read_provenance(t)
    assert prov == {"store": ens.store_.location, "generation": 1, "task": "classification",
                    "config_hash": ens.meta_["config_hash"], "vote": "hard"}
    small = out_path.stat().st_size

    ens.unlearn([int(train.ids[0])])
    assert main(["predict", *common, "--input", str(x_path), "--output", str(out_path),
                 "--shard-proba"]) == 0
    assert json.loads(capsys.readouterr().out)["generation"] == 2
    t = pq.read_table(out_path)
    assert read_provenance(t)["generation"] == 2
    assert t.column("shard_proba").type.value_type.value_type == pa.float32()
    assert len(t.column("shard_proba")[0].as_py()) == tiny_config.sharding.n_shards
    assert out_path.stat().st_size > small
