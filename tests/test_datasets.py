"""Dataset loaders, tested on files written here in the real formats."""

import gzip
import struct

import numpy as np
import pytest

from sisa_ray.datasets import (
    load_dataset,
    load_fashion_mnist,
    read_idx,
    read_parquet,
    write_parquet,
)


def write_idx(path, arr: np.ndarray, gz: bool):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    blob = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (12, 28, 28))
    ytr = np.arange(12) % 10
    xte = rng.integers(0, 256, (5, 28, 28))
    yte = np.arange(5)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", xtr, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", ytr, gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", xte, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", yte, gz)
    train, test = load_fashion_mnist(str(tmp_path))
    assert train.features.shape == (12, 1, 28, 28) and test.features.shape == (5, 1, 28, 28)
    assert train.ids.tolist() == list(range(12))
    np.testing.assert_allclose(train.features[3, 0], xtr[3] / 255.0, rtol=1e-6)
    assert train.labels.tolist() == ytr.tolist()
    assert train.n_classes == 10


def test_truncated_idx_is_reported(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    write_idx(p, np.arange(10), gz=False)
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(p)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("sisa_ray.datasets.DEBIAN_FASHION_MNIST", ())
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist.*--download"):
        load_fashion_mnist(str(tmp_path))


def test_parquet_round_trip_and_test_split(tmp_path, digits):
    train, test = digits
    write_parquet(train.take(np.arange(40)), str(tmp_path / "tr.parquet"))
    write_parquet(test.take(np.arange(10)), str(tmp_path / "te.parquet"))
    tr, te = load_dataset(f"parquet:{tmp_path / 'tr.parquet'}",
                          test=f"parquet:{tmp_path / 'te.parquet'}")
    assert tr.ids.tolist() == train.ids[:40].tolist()
    np.testing.assert_array_equal(tr.features, train.features[:40].reshape(40, -1))
    assert tr.n_classes == te.n_classes == 10
    back = read_parquet(str(tmp_path / "tr.parquet"))
    assert back.fingerprint() == tr.fingerprint()


def test_digits_split_is_fixed(digits):
    train, test = digits
    assert len(train) == 1437 and len(test) == 360
    assert not set(train.ids) & set(test.ids)
    assert train.features.max() <= 1.0


def test_unknown_dataset_lists_known():
    with pytest.raises(ValueError, match="Known datasets"):
        load_dataset("imagenet")
