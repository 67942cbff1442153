"""The manifest: the one small object that says which files are live.

Shard data and checkpoints are always written to new versioned paths
(``shards/<shard>/v<version>/...``); the manifest pointing at them is replaced atomically, and
last. A crash before the replace leaves the old state, after it the new one; files no manifest
references are garbage, collected by :func:`collect_garbage`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .store import Store, StoreError

MANIFEST = "manifest.json"
STORE_META = "store.json"
SHARDS_DIR = "shards"


def shard_dir(shard: int, version: int) -> str:
    return f"{SHARDS_DIR}/{shard:04d}/v{version:06d}"


@dataclass
class FileRef:
    path: str
    sha256: str

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256}


@dataclass
class ShardEntry:
    """The live state of one shard: its data and one checkpoint per completed slice step."""

    shard: int
    version: int
    n_samples: int
    slice_counts: list[int]
    data: FileRef
    checkpoints: list[FileRef]

    def to_dict(self) -> dict:
        return {
            "shard": self.shard, "version": self.version, "n_samples": self.n_samples,
            "slice_counts": list(self.slice_counts), "data": self.data.to_dict(),
            "checkpoints": [c.to_dict() for c in self.checkpoints],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ShardEntry:
        return cls(
            shard=int(d["shard"]), version=int(d["version"]), n_samples=int(d["n_samples"]),
            slice_counts=[int(c) for c in d["slice_counts"]], data=FileRef(**d["data"]),
            checkpoints=[FileRef(**c) for c in d["checkpoints"]],
        )


@dataclass
class Manifest:
    generation: int
    config_hash: str
    data_fingerprint: str
    shards: list[ShardEntry]
    applied_requests: list[str] = field(default_factory=list)
    deleted_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "format": 1, "generation": self.generation, "config_hash": self.config_hash,
            "data_fingerprint": self.data_fingerprint,
            "shards": [s.to_dict() for s in self.shards],
            "applied_requests": list(self.applied_requests),
            "deleted_ids": sorted(int(i) for i in self.deleted_ids),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        return cls(
            generation=int(d["generation"]), config_hash=d["config_hash"],
            data_fingerprint=d["data_fingerprint"],
            shards=[ShardEntry.from_dict(s) for s in d["shards"]],
            applied_requests=list(d.get("applied_requests", [])),
            deleted_ids=[int(i) for i in d.get("deleted_ids", [])],
        )

    def copy(self) -> Manifest:
        return copy.deepcopy(self)

    def referenced(self) -> set[str]:
        refs = {s.data.path for s in self.shards}
        refs.update(c.path for s in self.shards for c in s.checkpoints)
        return refs


def read_manifest(store: Store) -> Manifest | None:
    if not store.exists(MANIFEST):
        return None
    try:
        return Manifest.from_dict(store.read_json(MANIFEST))
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(
            f"{store.location}: {MANIFEST} is malformed ({e}). Restore it from backup."
        ) from e


def write_manifest(store: Store, manifest: Manifest) -> None:
    """Atomically make ``manifest`` the live state."""
    store.write_json(MANIFEST, manifest.to_dict())


def collect_garbage(store: Store, manifest: Manifest) -> list[str]:
    """Delete shard files the live manifest does not reference (old versions, half-written ones).

    Old versions hold models and data that saw deleted samples: they must not outlive the swap.
    """
    live = manifest.referenced()
    removed = []
    for rel in store.list(SHARDS_DIR):
        if rel not in live:
            store.delete(rel)
            removed.append(rel)
    return removed
