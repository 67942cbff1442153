"""The sisa-ray CLI end to end (in-process, local backend; one Ray run in test_ray.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import snapshot

from sisa_ray.cli import main
from sisa_ray.datasets import write_parquet


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def parquet_data(tmp_path, tiny):
    train, test = tiny
    write_parquet(train, str(tmp_path / "train.parquet"))
    write_parquet(test, str(tmp_path / "test.parquet"))
    return tmp_path / "train.parquet", tmp_path / "test.parquet"


def test_train_delete_predict_status_verify(tmp_path, capsys, parquet_data, tiny):
    train, test = tiny
    tr, te = parquet_data
    store = str(tmp_path / "store")
    common = ["--store", store, "--backend", "local", "--json"]
    code, out, _ = run(capsys, "train", *common, "--dataset", f"parquet:{tr}", "--test",
                       f"parquet:{te}", "--shards", "3", "--slices", "2", "--epochs", "2")
    assert code == 0
    res = json.loads(out)
    assert len(res["shards"]) == 3 and sum(s["n_samples"] for s in res["shards"]) == len(train)
    assert 0.0 < res["test_accuracy"]["ensemble_hard"] <= 1.0
    assert len(res["test_accuracy"]["shards"]) == 3

    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(f"{train.ids[0]}\n{train.ids[1]}, {train.ids[2]}\n")
    code, out, _ = run(capsys, "delete", *common, "--ids-file", str(ids_file),
                       "--request-id", "r1")
    assert code == 0
    rep = json.loads(out)
    assert rep["request_id"] == "r1" and sorted(rep["deleted"]) == sorted(train.ids[:3].tolist())
    assert rep["retrained_sample_steps"] > 0 and rep["shards"]
    assert {"shard", "restart_slice", "sample_steps"} <= set(rep["shards"][0])

    code, out, _ = run(capsys, "delete", *common, "--ids", f"{train.ids[1]},{train.ids[5]}")
    rep = json.loads(out)
    assert rep["already_deleted"] == [int(train.ids[1])] and rep["deleted"] == [int(train.ids[5])]

    code, out, _ = run(capsys, "delete", *common, "--ids", ",".join(map(str, train.ids[:3])),
                       "--request-id", "r1")
    assert json.loads(out)["duplicate_request"] is True

    out_path = tmp_path / "pred.parquet"
    code, out, _ = run(capsys, "predict", *common, "--input", str(te), "--output", str(out_path),
                       "--vote", "soft")
    assert code == 0 and json.loads(out)["rows"] == len(test)
    table = pq.read_table(out_path)
    assert table.column_names == ["id", "prediction", "proba", "shard_proba"]
    proba = np.array(table.column("proba").to_pylist())
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    assert (proba.argmax(1) == table.column("prediction").to_numpy()).all()
    assert len(table.column("shard_proba")[0].as_py()) == 3

    code, out, _ = run(capsys, "status", *common)
    st = json.loads(out)
    assert st["ledger"] == {"requests": 2, "completed": 2, "pending": 0, "abandoned": 0,
                            "deleted_ids": 4}
    assert st["deleted_ids"] == 4 and st["n_train_live"] == len(train) - 4

    code, out, _ = run(capsys, "verify", *common)
    assert code == 0 and json.loads(out)["identical"] is True


def test_human_output_and_errors(tmp_path, capsys):
    store = str(tmp_path / "store")
    code, out, err = run(capsys, "train", "--store", store, "--backend", "local", "--shards", "2",
                         "--slices", "1", "--epochs", "1")
    assert code == 0 and "Test accuracy: majority vote" in out and "shard   1" in out
    assert "[train] shard" in err  # progress display
    before = snapshot(store)
    code, _, err = run(capsys, "delete", "--store", store, "--backend", "local", "--ids", "3,x")
    assert code == 2 and "must be integers" in err and "'x'" in err
    code, _, err = run(capsys, "delete", "--store", store, "--backend", "local", "--ids", "")
    assert code == 2 and "empty" in err
    code, _, err = run(capsys, "delete", "--store", store, "--backend", "local",
                       "--ids", "123456789")
    assert code == 2 and "never trained on" in err and "123456789" in err
    assert snapshot(store) == before
    code, out, err = run(capsys, "status", "--store", str(tmp_path / "nope"), "--backend", "local",
                         "--json")
    assert code == 2 and "Train one first" in json.loads(out)["error"]


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sisa_ray", "--help"], capture_output=True,
                         text=True, check=True)
    for cmd in ("train", "delete", "predict", "status", "verify"):
        assert cmd in out.stdout
