"""The manifest: the one small object that says which files are live.

Shard data and checkpoints are always written to new versioned paths
(``shards/<shard>/v<version>/...``); the manifest pointing at them is replaced atomically, and
last. A crash before the replace leaves the old state, after it the new one; files no manifest
references are garbage, collected by :func:`collect_garbage`.
"""

from __future__ import annotations

import copy
import json
import posixpath
import uuid
from dataclasses import dataclass, field

from .store import Store, StoreError, sha256

MANIFEST = "manifest.json"
MANIFESTS_DIR = "manifests"
FORMAT = 2
STORE_META = "store.json"
SHARDS_DIR = "shards"
STAGING_DIR = "staging"  # data being sharded by a fit; nothing there outlives it
TEST_DIR = "test"  # versions of the stored test split; a deletion writes a new one


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
    """Which files are live, and how far into the ledger the live state goes.

    ``applied_through`` is the ledger sequence number of the acknowledgement of the last request
    this state applies (requests are applied in acknowledgement order), so a request acknowledged
    at or before it is already live, and a completed request after it has come back (a restored
    backup). ``token`` is the writer lock's fencing token of the writer that made it. ``tag`` is
    the version tag of the pointer it was read from, for the compare-and-swap of the next write.
    """

    generation: int
    config_hash: str
    data_fingerprint: str
    shards: list[ShardEntry]
    applied_through: int = 0
    token: int = 0
    tag: str | None = field(default=None, compare=False)
    test: FileRef | None = None  # the stored test split, when the fit was given one

    def to_dict(self) -> dict:
        d = {
            "format": FORMAT, "generation": self.generation, "config_hash": self.config_hash,
            "data_fingerprint": self.data_fingerprint,
            "shards": [s.to_dict() for s in self.shards],
            "applied_through": self.applied_through, "token": self.token,
        }
        if self.test is not None:
            d["test"] = self.test.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, tag: str | None = None) -> Manifest:
        return cls(
            generation=int(d["generation"]), config_hash=d["config_hash"],
            data_fingerprint=d["data_fingerprint"],
            shards=[ShardEntry.from_dict(s) for s in d["shards"]],
            applied_through=int(d["applied_through"]), token=int(d["token"]), tag=tag,
            test=FileRef(**d["test"]) if d.get("test") else None,
        )

    def copy(self) -> Manifest:
        return copy.deepcopy(self)

    def referenced(self) -> set[str]:
        refs = {s.data.path for s in self.shards}
        refs.update(c.path for s in self.shards for c in s.checkpoints)
        if self.test is not None:
            refs.add(self.test.path)
        return refs


def _pointer(store: Store) -> tuple[dict | None, str | None]:
    raw, tag = store.read_tagged(MANIFEST)
    if raw is None:
        return None, None
    ptr = store.read_json(MANIFEST, raw)
    if not isinstance(ptr, dict) or ptr.get("format") != FORMAT:
        got = ptr.get("format") if isinstance(ptr, dict) else ptr
        raise StoreError(
            f"{store.location}: {MANIFEST} has format {got!r}; "
            f"this sisa-ray reads format {FORMAT}. Use the sisa-ray version that wrote the store."
        )
    return ptr, tag


def live_generation(store: Store) -> int | None:
    """The live generation, from the small pointer object alone (None before the first fit)."""
    ptr, _ = _pointer(store)
    return None if ptr is None else int(ptr["generation"])


def read_manifest(store: Store) -> Manifest | None:
    ptr, tag = _pointer(store)
    if ptr is None:
        return None
    try:
        body_raw = store.read_optional(ptr["body"])
        if body_raw is None:
            raise StoreError(
                f"{store.location}: {MANIFEST} points at {ptr['body']}, which is missing: the "
                f"store was partly restored. Restore {MANIFEST} together with {MANIFESTS_DIR}/ "
                f"and {SHARDS_DIR}/ from the same backup."
            )
        if sha256(body_raw) != ptr["sha256"]:
            raise StoreError(
                f"{store.location}/{ptr['body']} does not match the SHA-256 in {MANIFEST}; the "
                "manifest is corrupt. Restore the store from backup."
            )
        return Manifest.from_dict(store.read_json(ptr["body"], body_raw), tag)
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(
            f"{store.location}: {MANIFEST} is malformed ({e}). Restore it from backup."
        ) from e


def write_manifest(store: Store, manifest: Manifest, lock) -> None:
    """Make ``manifest`` the live state: write its body to a new path, then swap the pointer.

    The swap is a compare-and-swap against the pointer ``manifest`` was derived from
    (``manifest.tag``), so a writer whose lease was taken over, or that read a state another
    writer has since replaced, fails here instead of overwriting newer state.
    """
    lock.check()
    body = json.dumps(manifest.to_dict(), indent=1, sort_keys=True).encode()
    rel = f"{MANIFESTS_DIR}/{manifest.generation:010d}-{uuid.uuid4().hex[:8]}.json"
    store.write_bytes(rel, body)
    ptr = {"format": FORMAT, "generation": manifest.generation, "body": rel,
           "sha256": sha256(body), "token": lock.token}
    lock.check()
    if not store.replace_if(MANIFEST, json.dumps(ptr, sort_keys=True).encode(), manifest.tag):
        store.delete(rel)
        raise StoreError(
            f"{store.location}: the live manifest changed while this writer worked (another "
            "writer, or this one's lock lease expired). Nothing was swapped in; run the command again."
        )
    manifest.tag = store.read_tagged(MANIFEST)[1]


def collect_garbage(store: Store, manifest: Manifest) -> list[str]:
    """Delete files the live manifest does not reference: old shard versions, half-written ones,
    old manifest bodies, and temporaries left by interrupted writes. Call it under the writer lock.

    Old versions hold models and data that saw deleted samples: they must not outlive the swap.
    """
    live = manifest.referenced()
    ptr, _ = _pointer(store)
    keep_body = None if ptr is None else ptr["body"]
    removed = []
    for rel in (store.list(SHARDS_DIR) + store.list(MANIFESTS_DIR) + store.list(STAGING_DIR)
                + store.list(TEST_DIR)):
        if rel not in live and rel != keep_body:
            store.delete(rel)
            removed.append(rel)
    # emptied version folders go too: left behind, every later listing would walk them
    store.delete_empty_dirs(sorted({posixpath.dirname(r) for r in removed}, reverse=True))
    removed += store.clear_temporaries()  # interrupted atomic writes (pointer, ledger, data)
    return removed


def read_store_meta(store: Store) -> dict:
    """``store.json``, checked: its format, and that it holds a config."""
    raw = store.read_optional(STORE_META)
    if raw is None:
        raise StoreError(
            f"No sisa-ray ensemble at {store.location}. Train one first: "
            f"`sisa-ray train --store {store.location}`."
        )
    meta = store.read_json(STORE_META, raw)
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise StoreError(
            f"{store.location}/{STORE_META} has format {got!r}; this sisa-ray reads format "
            f"{STORE_FORMAT}. Use the sisa-ray version that wrote the store, or train a new one."
        )
    missing = [k for k in ("config", "config_hash", "dataset") if k not in meta]
    if missing:
        raise StoreError(
            f"{store.location}/{STORE_META} lacks {missing}: it was edited or cut short. "
            "Restore it from backup, or train a new store."
        )
    return meta


STORE_FORMAT = 2
