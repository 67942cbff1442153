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
                       "--vote", "soft", "--shard-proba")
    assert code == 0 and json.loads(out)["rows"] == len(test)
    table = pq.read_table(out_path)
    assert table.column_names == ["id", "prediction", "proba", "shard_proba", "label"]
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
    # progress in tqdm's format, one line per finished shard (stderr is not a terminal here)
    assert "train:  50% 1/2 [" in err and "train: 100% 2/2 [" in err
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


@pytest.fixture
def cli_store(tmp_path, capsys, parquet_data):
    tr, te = parquet_data
    store = str(tmp_path / "store")
    code, _, err = run(capsys, "train", "--store", store, "--backend", "local", "--quiet",
                       "--dataset", f"parquet:{tr}", "--test", f"parquet:{te}", "--shards", "2",
                       "--slices", "2", "--epochs", "1", "--n-classes", "10")
    assert code == 0, err
    return store


@pytest.mark.parametrize("ids, message", [
    ("1_021", r"integers \(digits, optional sign\); got \['1_021'\]"),
    ("99999999999999999999", r"must fit in int64"),
    ("18446744073709551615", r"must fit in int64"),
    ("3,,x", r"got \['x'\]"),
])
def test_bad_ids_are_one_line_and_change_nothing(cli_store, capsys, ids, message, tmp_path):
    before = snapshot(tmp_path / "store")
    code, out, err = run(capsys, "delete", "--store", cli_store, "--backend", "local",
                         "--ids", ids)
    assert code == 2 and err.count("\n") == 1
    import re
    assert re.search(message, err), err
    assert snapshot(tmp_path / "store") == before


def test_the_same_train_again_opens_the_store_and_retrains_nothing(tmp_path, capsys):
    """The README's way to resume an interrupted fit is to run the same command again; on a
    store it finished it must open it, not crash, and leave every byte as it was."""
    argv = ["train", "--store", str(tmp_path / "s"), "--backend", "local", "--shards", "2",
            "--slices", "2", "--epochs", "1", "--json"]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and json.loads(out)["already_trained"] is False
    before = snapshot(tmp_path / "s")
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    res = json.loads(out)
    assert res["already_trained"] is True and res["nodes"] == 0
    assert snapshot(tmp_path / "s") == before


def test_store_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    code, _, err = run(capsys, "status", "--store", str(f), "--backend", "local")
    assert code == 2 and "is a file; a store is a directory" in err and err.count("\n") == 1


def _write_features(path, rows):
    import pyarrow as pa

    pq.write_table(pa.table({"id": pa.array(range(len(rows)), pa.int64()),
                             "features": pa.array(rows, type=pa.list_(pa.float32()))}), path)


@pytest.mark.parametrize("rows, message", [
    ([[0.0] * 63, [0.0] * 65], r"ragged 'features': row 0 has 63 values but row\(s\) \[1\] "
                               r"have \[65\]"),
    ([[0.0] * 64, None], r"'features' is null in row\(s\) \[1\]"),
    ([], "has no rows; nothing to predict"),
])
def test_predict_checks_every_row(cli_store, capsys, tmp_path, rows, message):
    src = tmp_path / "in.parquet"
    _write_features(src, rows)
    code, _, err = run(capsys, "predict", "--store", cli_store, "--backend", "local",
                       "--input", str(src), "--output", str(tmp_path / "out.parquet"))
    import re
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "out.parquet").exists()


def test_already_deleted_ids_report_no_retrain(cli_store, capsys, tiny):
    train, _ = tiny
    common = ["--store", cli_store, "--backend", "local"]
    assert run(capsys, "delete", *common, "--ids", str(train.ids[0]), "--quiet")[0] == 0
    code, out, _ = run(capsys, "delete", *common, "--ids", str(train.ids[0]),
                       "--request-id", "again")
    assert code == 0 and "nothing to retrain" in out and "inf" not in out
    code, out, _ = run(capsys, "delete", *common, "--ids", str(train.ids[0]),
                       "--request-id", "again2", "--json")
    d = json.loads(out)  # strict JSON: no Infinity
    assert d["sample_step_speedup"] is None and d["already_deleted"] == [int(train.ids[0])]


def test_n_classes_is_recorded_and_a_retrain_with_it_is_identical(cli_store, capsys, tmp_path,
                                                                 tiny):
    """Delete every sample of the top class, then retrain the reduced Parquet with the recorded
    --n-classes: the same config hash, the same bits."""
    from sisa_ray.ensemble import SISAEnsemble

    train, _ = tiny
    top = int(train.labels.max())
    victims = train.ids[train.labels == top]
    common = ["--store", cli_store, "--backend", "local", "--quiet"]
    assert run(capsys, "delete", *common, "--ids", ",".join(map(str, victims)))[0] == 0
    code, out, _ = run(capsys, "status", "--store", cli_store, "--backend", "local", "--json")
    assert json.loads(out)["config"]["training"]["n_classes"] == 10
    reduced = tmp_path / "reduced.parquet"
    write_parquet(train.without_ids(victims), str(reduced))
    other = str(tmp_path / "retrain")
    assert run(capsys, "train", "--store", other, "--backend", "local", "--quiet", "--dataset",
               f"parquet:{reduced}", "--shards", "2", "--slices", "2", "--epochs", "1",
               "--n-classes", "10")[0] == 0
    a = SISAEnsemble.open(cli_store, backend="local", recover=False)
    b = SISAEnsemble.open(other, backend="local", recover=False)
    assert a.config_.config_hash() == b.config_.config_hash()
    from sisa_ray.core.checkpoint import states_identical

    for x, y in zip(a.shard_states(), b.shard_states()):
        assert states_identical(x, y) == []


def test_json_output_is_strict_json(capsys):
    """An undefined number is null under --json, never NaN or Infinity."""
    from sisa_ray import cli

    payload = {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}}

    class Args:
        json = True

    cli._emit(Args, payload, "")
    assert json.loads(capsys.readouterr().out) == {"a": None, "b": [None, 1.5], "c": {"d": None}}
