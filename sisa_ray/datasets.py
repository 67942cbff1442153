"""Datasets with stable sample ids.

Built-in datasets use each sample's index in the official training split as its id (digits, which
has no official split, uses its index in ``sklearn.datasets.load_digits``). The test split is never
sharded. Features are scaled by fixed constants only (see :mod:`sisa_ray.core.data`).

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (always available offline);
  a fixed stratified 80/20 split.
* ``fashion-mnist``: IDX files (plain or ``.gz``) from ``data_dir``, or the Debian package
  ``dataset-fashion-mnist``, read by torchvision's ``FashionMNIST``; or torchvision's download
  when ``download=True``.
* ``mnist``, ``cifar10``: torchvision datasets under ``data_dir`` (``download=True`` to fetch).
* ``parquet:PATH``: columns ``id`` (int64, unique), ``label`` (int64), ``features``
  (list<float32>, all the same length).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .core.data import SampleSet

DATASETS = ("digits", "diabetes", "fashion-mnist", "mnist", "cifar10", "parquet:PATH")
DEBIAN_FASHION_MNIST = (
    "/usr/share/dataset-fashion-mnist",
    "/usr/share/fashion-mnist",
    "/usr/share/datasets/fashion-mnist",
)
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def load_digits() -> tuple[SampleSet, SampleSet]:
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    ids = np.arange(len(y), dtype=np.int64)
    tr, te = train_test_split(ids, test_size=0.2, random_state=0, stratify=y)
    tr, te = np.sort(tr), np.sort(te)
    return (
        SampleSet(ids=tr, features=x[tr], labels=y[tr], n_classes=10, name="digits"),
        SampleSet(ids=te, features=x[te], labels=y[te], n_classes=10, name="digits-test"),
    )


def load_diabetes() -> tuple[SampleSet, SampleSet]:
    """scikit-learn's bundled diabetes data (442 patients, 10 features, a disease-progression
    score): a regression task. Features as scikit-learn ships them (mean-centred and scaled once,
    over the whole bundled set, so a deletion does not change them); a fixed 80/20 split."""
    from sklearn.datasets import load_diabetes as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.float32)
    ids = np.arange(len(y), dtype=np.int64)
    tr, te = train_test_split(ids, test_size=0.2, random_state=0)
    tr, te = np.sort(tr), np.sort(te)
    return (
        SampleSet(ids=tr, features=x[tr], labels=y[tr], n_classes=1, name="diabetes",
                  task="regression"),
        SampleSet(ids=te, features=x[te], labels=y[te], n_classes=1, name="diabetes-test",
                  task="regression"),
    )


def read_fashion_mnist_files(files: dict[str, Path]) -> dict[str, np.ndarray]:
    """Read the four Fashion-MNIST IDX files (plain or ``.gz``, any of the names
    :func:`_find_idx` accepts) with torchvision's ``FashionMNIST`` reader.

    torchvision reads plain files named as in the official release from
    ``<root>/FashionMNIST/raw``: a scratch root is laid out that way, with links to plain files
    and ``.gz`` files decompressed by torchvision's ``extract_archive``; the files given are
    never changed. A truncated or corrupt file raises ``ValueError`` naming it.
    """
    import tempfile

    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import extract_archive

    with tempfile.TemporaryDirectory(prefix="sisa-ray-fashion-mnist-") as root:
        raw = Path(root) / "FashionMNIST" / "raw"
        staging = Path(root) / "staging"
        raw.mkdir(parents=True)
        staging.mkdir()
        for key, path in files.items():
            target = raw / _FASHION_FILES[key]
            if path.suffix == ".gz":
                os.replace(extract_archive(str(path), str(staging)), target)
            else:
                target.symlink_to(path.resolve())
        out = {}
        for train in (True, False):
            split = "train" if train else "test"
            try:
                ds = FashionMNIST(root, train=train, download=False)
            except (AssertionError, RuntimeError, TypeError, ValueError) as e:
                names = [str(files[f"{split}_images"]), str(files[f"{split}_labels"])]
                raise ValueError(
                    f"{names} are not valid Fashion-MNIST IDX files (truncated or corrupt: "
                    f"{e or type(e).__name__}). Fetch them again."
                ) from None
            if len(ds.data) != len(ds.targets):
                raise ValueError(
                    f"{files[f'{split}_images']} has {len(ds.data)} images but "
                    f"{files[f'{split}_labels']} has {len(ds.targets)} labels: a file is "
                    "truncated or from another release. Fetch them again."
                )
            out[f"{split}_images"], out[f"{split}_labels"] = ds.data.numpy(), ds.targets.numpy()
    return out


def _find_idx(directory: Path, stem: str) -> Path | None:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        for sub in ("", "raw", "FashionMNIST/raw", "fashion-mnist"):
            p = directory / sub / cand
            if p.is_file():
                return p
    return None


def fashion_mnist_dirs(data_dir: str | None) -> list[Path]:
    dirs = [Path(data_dir)] if data_dir else []
    dirs += [Path(d) for d in DEBIAN_FASHION_MNIST]
    return dirs


def load_fashion_mnist(
    data_dir: str | None = None, download: bool = False
) -> tuple[SampleSet, SampleSet]:
    """Fashion-MNIST from local IDX files; torchvision downloads only when ``download=True``."""
    for d in fashion_mnist_dirs(data_dir):
        found = {k: _find_idx(d, v) for k, v in _FASHION_FILES.items()}
        if all(found.values()):
            arrays = read_fashion_mnist_files(found)
            return _images_to_sets(
                arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                arrays["test_labels"], "fashion-mnist",
            )
    if download:
        return _torchvision("fashion-mnist", data_dir or "./data", True)
    searched = ", ".join(str(d) for d in fashion_mnist_dirs(data_dir))
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found (searched {searched}). Install the Debian package "
        "(`apt-get install dataset-fashion-mnist`), pass --data-dir with the four "
        "*-idx*-ubyte[.gz] files, or pass --download to fetch them with torchvision."
    )


def _images_to_sets(xtr, ytr, xte, yte, name: str) -> tuple[SampleSet, SampleSet]:
    def prep(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[:, None]  # N,H,W -> N,1,H,W
        elif x.ndim == 4 and x.shape[-1] in (1, 3):
            x = x.transpose(0, 3, 1, 2)  # N,H,W,C -> N,C,H,W
        return (x.astype(np.float32) / 255.0)

    ytr, yte = np.asarray(ytr, np.int64), np.asarray(yte, np.int64)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    return (
        SampleSet(ids=np.arange(len(ytr), dtype=np.int64), features=prep(xtr), labels=ytr,
                  n_classes=n_classes, name=name),
        SampleSet(ids=np.arange(len(yte), dtype=np.int64), features=prep(xte), labels=yte,
                  n_classes=n_classes, name=f"{name}-test"),
    )


def _torchvision(name: str, data_dir: str | None, download: bool) -> tuple[SampleSet, SampleSet]:
    from torchvision import datasets as tvd

    cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[name]
    root = data_dir or "./data"
    try:
        tr = cls(root, train=True, download=download)
        te = cls(root, train=False, download=download)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"{name} not found under {root} ({e}). Pass --data-dir with the torchvision layout, "
            "or --download to fetch it."
        ) from e
    return _images_to_sets(
        np.asarray(tr.data), np.asarray(tr.targets), np.asarray(te.data), np.asarray(te.targets),
        name,
    )


def read_parquet(path: str, n_classes: int | None = None, name: str | None = None) -> SampleSet:
    """Read user data: ``id`` int64 unique, ``label`` int64, ``features`` list<float32>."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"Parquet file {path} does not exist.") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path} is not a readable Parquet file ({e}).") from e
    return samples_from_table(table, path, n_classes, name or Path(path).stem)


def samples_from_table(table: pa.Table, where: str, n_classes: int | None,
                       name: str) -> SampleSet:
    """Check a table of user data (any part of a Parquet dataset) and turn it into samples."""
    path = where
    missing = [c for c in ("id", "label", "features") if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}. Expected columns 'id' (int64, unique), "
            f"'label' (int64) and 'features' (list<float32>); found {table.column_names}."
        )
    regression = pa.types.is_floating(table.schema.field("label").type)
    for col in ("id", "label"):
        typ = table.schema.field(col).type
        if not pa.types.is_integer(typ) and not (col == "label" and regression):
            raise ValueError(f"{path}: column '{col}' must be int64"
                             + (" (or float for a regression label)" if col == "label" else "")
                             + f". Found {typ}.")
        if table.column(col).null_count:
            raise ValueError(f"{path}: column '{col}' has null values; every row needs one.")
    feats = table.column("features").combine_chunks()
    if not (pa.types.is_list(feats.type) or pa.types.is_large_list(feats.type)
            or pa.types.is_fixed_size_list(feats.type)):
        raise ValueError(f"{path}: column 'features' must be list<float32>. Found {feats.type}.")
    if feats.null_count:
        raise ValueError(f"{path}: column 'features' has null rows; every row needs features.")
    ids = table.column("id").to_numpy().astype(np.int64)
    if len(ids) and not pa.types.is_fixed_size_list(feats.type):
        lengths = np.diff(feats.offsets.to_numpy())
        if (lengths != lengths[0]).any():
            bad = ids[lengths != lengths[0]][:10].tolist()
            raise ValueError(
                f"{path}: ragged 'features': rows have different lengths "
                f"({sorted(set(lengths.tolist()))[:5]}); first odd ids {bad}. Every row must "
                "have the same number of features."
            )
    width = len(feats[0]) if len(ids) else 0
    x = feats.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids), width)
    if not np.isfinite(x).all():
        bad = ids[~np.isfinite(x).all(axis=1)][:10].tolist()
        raise ValueError(
            f"{path}: 'features' contains NaN or infinite values (ids, first 10: {bad}). "
            "Impute or drop those rows."
        )
    if regression:
        return SampleSet(ids=ids, features=x, labels=table.column("label").to_numpy(),
                         n_classes=1, name=name, task="regression")
    labels = table.column("label").to_numpy().astype(np.int64)
    if n_classes is None:
        n_classes = max(2, int(labels.max()) + 1) if len(labels) else 2
    return SampleSet(ids=ids, features=x, labels=labels, n_classes=n_classes, name=name)


def load_dataset(
    name: str, *, data_dir: str | None = None, download: bool = False,
    test: str | None = None, n_classes: int | None = None,
) -> tuple[SampleSet, SampleSet | None]:
    """Return ``(train, test)`` for a dataset name as the CLI takes it. ``n_classes`` fixes the
    number of classes of Parquet data (otherwise the largest label present + 1)."""
    if name == "digits":
        return load_digits()
    if name == "diabetes":
        return load_diabetes()
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, download)
    if name in ("mnist", "cifar10"):
        return _torchvision(name, data_dir, download)
    if name.startswith("parquet:"):
        test_set = None
        if test is not None:
            if not test.startswith("parquet:"):
                raise ValueError(f"--test must be parquet:PATH. Got {test!r}.")
            test_set = read_parquet(test[len("parquet:"):], n_classes)
        train = read_parquet(name[len("parquet:"):], n_classes)
        if test_set is not None and n_classes is None:
            n_classes = max(train.n_classes, test_set.n_classes)
            if train.task == "classification":
                train = SampleSet(ids=train.ids, features=train.features, labels=train.labels,
                                  n_classes=n_classes, name=train.name)
                test_set = SampleSet(ids=test_set.ids, features=test_set.features,
                                     labels=test_set.labels, n_classes=n_classes,
                                     name=test_set.name)
        return train, test_set
    raise ValueError(f"Unknown dataset {name!r}. Known datasets: {list(DATASETS)}.")


def write_parquet(samples: SampleSet, path: str) -> None:
    """Write samples in the Parquet format :func:`read_parquet` reads (flat features)."""
    flat = samples.features.reshape(len(samples), -1)
    table = pa.table({
        "id": pa.array(samples.ids, pa.int64()),
        "label": pa.array(samples.labels,
                          pa.float64() if samples.task == "regression" else pa.int64()),
        "features": pa.array(list(flat), type=pa.list_(pa.float32())),
    })
    pq.write_table(table, path)
