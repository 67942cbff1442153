"""Slice checkpoints: everything needed to continue a shard bit-identically.

A checkpoint holds the model and optimizer state after a slice step, the step index, the config
hash and a digest of the sample ids seen so far. Random streams need no saved state: every one is
re-seeded from ``(seed, shard, step, epoch)`` (see :mod:`sisa_ray.core.training`).

Checkpoints are plain ``torch.save`` archives of tensors and primitives, read back with
``torch.load(..., weights_only=True)``; nothing unpickles arbitrary objects. The manifest records
each file's SHA-256, checked on every load, so a truncated or altered file is refused by name.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

from .plan import ids_digest
from .store import StoreError, sha256

__all__ = ["Checkpoint", "ids_digest", "sha256", "states_identical"]


@dataclass
class Checkpoint:
    """State of one shard after slice step ``step`` (``-1``: freshly initialised)."""

    shard: int
    step: int
    config_hash: str
    ids_digest: str
    n_samples: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(
            {
                "format": 1,
                "shard": self.shard,
                "step": self.step,
                "config_hash": self.config_hash,
                "ids_digest": self.ids_digest,
                "n_samples": self.n_samples,
                "model_state": self.model_state,
                "optimizer_state": self.optimizer_state,
            },
            buf,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(
        cls, data: bytes, *, where: str, expected_sha256: str | None = None,
        expected_config_hash: str | None = None,
    ) -> Checkpoint:
        """Load and check a checkpoint. ``where`` names the file in error messages."""
        if expected_sha256 is not None and sha256(data) != expected_sha256:
            raise StoreError(
                f"Checkpoint '{where}' is corrupt: its SHA-256 does not match the manifest "
                f"({len(data)} bytes; truncated or altered). Restore it from backup, or rebuild "
                "the store with `sisa-ray train` on a new --store."
            )
        try:
            raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a damaged archive
            raise StoreError(
                f"Checkpoint '{where}' cannot be read ({type(e).__name__}: {e}). The file is "
                "truncated or not a sisa-ray checkpoint; rebuild the store with `sisa-ray train`."
            ) from e
        if expected_config_hash is not None and raw.get("config_hash") != expected_config_hash:
            raise StoreError(
                f"Checkpoint '{where}' was made with config {raw.get('config_hash')!r}, but the "
                f"store's config is {expected_config_hash!r}. The store mixes two trainings; "
                "rebuild it with `sisa-ray train` on a new --store."
            )
        return cls(
            shard=int(raw["shard"]),
            step=int(raw["step"]),
            config_hash=str(raw["config_hash"]),
            ids_digest=str(raw["ids_digest"]),
            n_samples=int(raw["n_samples"]),
            model_state=raw["model_state"],
            optimizer_state=raw["optimizer_state"],
        )


def states_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of tensors that differ between two state dicts (bitwise); empty means identical."""
    diffs = sorted(set(a) ^ set(b))
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape or _raw_bytes(x) != _raw_bytes(y):
            diffs.append(name)
    return diffs


def _raw_bytes(t: torch.Tensor) -> bytes:
    # Byte comparison, not ==: it tells -0.0 from 0.0 and treats equal NaN payloads as equal.
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
