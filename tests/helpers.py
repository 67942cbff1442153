"""Test helpers shared by several modules."""

from __future__ import annotations

import os

import numpy as np

from sisa_ray.core.data import SampleSet


def synthetic(n: int = 120, d: int = 6, n_classes: int = 3, seed: int = 0) -> SampleSet:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    x = rng.normal(size=(n, d)).astype(np.float32) + y[:, None]
    return SampleSet(ids=np.arange(n) * 7 + 3, features=x, labels=y, n_classes=n_classes,
                     name="synthetic")


def snapshot(root) -> dict[str, bytes]:
    """Every file under a store directory with its bytes."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out
