"""Dataset loaders, tested on files written here in the real formats."""

import gzip
import struct

import numpy as np
import pytest

from sisa_ray.datasets import (
    load_dataset,
    load_fashion_mnist,
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


def write_fashion_files(directory, gz: bool, names=None, n_train=12, n_test=5):
    """Four tiny Fashion-MNIST IDX files in the release format; returns what they hold."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test)[::-1] % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        name = (names or {}).get(stem, stem) + (".gz" if gz else "")
        write_idx(directory / name, arr, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["flat", "torchvision", "dotted"])
def test_fashion_mnist_from_idx_files(tmp_path, gz, layout):
    directory = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    names = ({s: s.replace("-idx", ".idx") for s in ("train-images-idx3-ubyte",
              "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
             if layout == "dotted" else None)
    arrays = write_fashion_files(directory, gz, names)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    train, test = load_fashion_mnist(str(tmp_path))
    assert train.features.shape == (12, 1, 28, 28) and test.features.shape == (5, 1, 28, 28)
    assert train.ids.tolist() == list(range(12)) and test.ids.tolist() == list(range(5))
    np.testing.assert_array_equal(train.features[:, 0],
                                  (arrays["train-images-idx3-ubyte"] / 255.0).astype(np.float32))
    np.testing.assert_array_equal(test.features[:, 0],
                                  (arrays["t10k-images-idx3-ubyte"] / 255.0).astype(np.float32))
    assert train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert train.n_classes == 10
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # read, never changed


@pytest.mark.parametrize("stem", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_truncated_idx_is_reported(tmp_path, stem):
    write_fashion_files(tmp_path, gz=False)
    p = tmp_path / stem
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(ValueError, match=f"{stem}.*truncated"):
        load_fashion_mnist(str(tmp_path))


def test_images_and_labels_of_different_lengths_are_refused(tmp_path):
    write_fashion_files(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(11) % 10, gz=False)
    with pytest.raises(ValueError, match="12 images but .* 11 labels"):
        load_fashion_mnist(str(tmp_path))


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
