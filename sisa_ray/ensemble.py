"""``SISAEnsemble``: the scikit-learn style facade of the exact path.

>>> ens = SISAEnsemble(config, store="/data/sisa").fit(train)      # doctest: +SKIP
>>> ens.predict(test.features)                                      # doctest: +SKIP
>>> report = ens.unlearn([3, 17, 42])                               # doctest: +SKIP

Deletion protocol (see DESIGN.md, "Durability and recovery"):

1. validate the ids (read-only: unknown ids are an error and nothing changes);
2. append the request to the ledger, durably: from here on it is acknowledged;
3. retrain every affected shard from its last clean slice into new versioned files;
4. replace the manifest atomically (the deletion is now live);
5. append ``completed`` to the ledger, then delete the files of the old versions.

A crash anywhere leaves the old or the new manifest. Opening the store again finishes every
acknowledged request that is not completed (:meth:`SISAEnsemble.open` does it first).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from .core.aggregation import aggregate, aggregate_regression
from .core.checkpoint import Checkpoint, sha256, states_identical
from .core.config import ResourceConfig, SISAConfig
from .core.data import SampleSet
from .core.ledger import Ledger
from .core.manifest import (
    STORE_META,
    FileRef,
    Manifest,
    ShardEntry,
    collect_garbage,
    read_manifest,
    shard_dir,
    write_manifest,
)
from .core.plan import DeletionPlan, ShardPlan, assign, epochs_per_step, sample_steps
from .core.store import Store, StoreError
from .shard import TrainJob, _parquet_bytes, read_store_meta

log = logging.getLogger(__name__)

TEST_DATA = "data/test.parquet"


class NotFittedError(RuntimeError):
    """The ensemble has no trained state yet."""


@dataclass
class ShardRetrain:
    shard: int
    restart_slice: int
    deleted: int
    sample_steps: int
    seconds: float
    train_seconds: float = 0.0


@dataclass
class UnlearnReport:
    """What a deletion request did."""

    request_id: str
    ids: list[int]
    deleted: list[int]
    already_deleted: list[int]
    shards: list[ShardRetrain]
    retrained_sample_steps: int
    full_retrain_sample_steps: int
    wall_seconds: float
    duplicate_request: bool = False

    @property
    def sample_step_speedup(self) -> float:
        if self.retrained_sample_steps == 0:
            return float("inf")
        return self.full_retrain_sample_steps / self.retrained_sample_steps

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sample_step_speedup"] = self.sample_step_speedup
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UnlearnReport:
        d = {k: v for k, v in d.items() if k != "sample_step_speedup"}
        d["shards"] = [ShardRetrain(**s) for s in d["shards"]]
        return cls(**d)


@dataclass
class VerifyReport:
    identical: bool
    shards: list[dict] = field(default_factory=list)
    predictions_identical: bool | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _default_request_id(ids: np.ndarray) -> str:
    return "req-" + hashlib.sha256(np.sort(ids).tobytes()).hexdigest()[:16]


def validate_ids(ids) -> np.ndarray:
    """Parse a deletion request's ids: a non-empty collection of integers."""
    if isinstance(ids, (str, bytes)) or np.ndim(ids) == 0:
        raise TypeError(
            f"ids must be a list of integer sample ids. Got {type(ids).__name__}: {ids!r}."
        )
    arr = np.asarray(list(ids), dtype=object)
    if arr.size == 0:
        raise ValueError("The deletion request is empty: give at least one sample id.")
    bad = [
        v for v in arr.tolist()
        if isinstance(v, bool) or not isinstance(v, (int, np.integer))
    ]
    if bad:
        raise TypeError(
            f"Sample ids must be integers. Got non-integer value(s): {bad[:10]}. "
            "Pass the int64 ids shown by `sisa-ray status` or your data's 'id' column."
        )
    return np.unique(np.asarray(arr.tolist(), dtype=np.int64))


class SISAEnsemble:
    """An exactly-unlearnable ensemble of shard models (Bourtoule et al., "Machine Unlearning",
    IEEE S&P 2021), each shard owned by a Ray actor.

    Parameters
    ----------
    config : SISAConfig, the sharding and training configuration.
    store : local path or ``pyarrow.fs`` URI where data, checkpoints, manifest and ledger live.
        A fresh temporary directory when None.
    backend : ``"ray"`` (shard actors; default) or ``"local"`` (in-process, no Ray).
    resources : what each shard actor reserves (Ray backend only).
    address : Ray cluster address (``"auto"``), or None for the local default / ``RAY_ADDRESS``.
    vote : ``"hard"`` (majority vote, ties to the smallest class) or ``"soft"`` (mean probability).
    executor : a ready executor object, overriding ``backend`` (used to inject failures in tests).
    """

    def __init__(
        self,
        config: SISAConfig | None = None,
        *,
        store: str | None = None,
        backend: str = "ray",
        resources: ResourceConfig | None = None,
        address: str | None = None,
        vote: str = "hard",
        executor=None,
    ) -> None:
        self.config = config
        self.store = store
        self.backend = backend
        self.resources = resources
        self.address = address
        self.vote = vote
        self.executor = executor

    # -- plumbing ----------------------------------------------------------------------------------

    def _executor(self):
        if self.executor is None:
            from .executor import make_executor

            self.executor = make_executor(self.backend, self.resources, self.address)
        return self.executor

    def _bind(self) -> None:
        cfg = self.config_
        self._executor().bind(self.store_.uri, cfg.sharding.n_shards, cfg.training.threads)

    def _check_fitted(self) -> None:
        if not hasattr(self, "manifest_"):
            raise NotFittedError(
                "This SISAEnsemble is not fitted yet. Call fit(data) first, or "
                "SISAEnsemble.open(store) for a store trained earlier."
            )

    # -- training ----------------------------------------------------------------------------------

    def fit(self, data: SampleSet, test: SampleSet | None = None, progress=None) -> SISAEnsemble:
        """Train every shard, slice by slice, in parallel; checkpoint after each slice.

        On a store that already holds this config and data, training resumes (finished stores
        are left as they are). A store holding another config or data is refused unchanged.
        """
        if not isinstance(data, SampleSet):
            raise TypeError(
                f"fit expects a SampleSet (see sisa_ray.datasets). Got {type(data).__name__}."
            )
        if len(data) == 0:
            raise ValueError("fit got an empty training set; give at least one sample.")
        if test is not None and (test.n_classes != data.n_classes or test.task != data.task):
            raise ValueError(
                f"The test set has n_classes={test.n_classes} but the training set has "
                f"{data.n_classes}; they must match."
            )
        config = self.config or SISAConfig()
        if not isinstance(config, SISAConfig):
            raise TypeError(f"config must be a SISAConfig. Got {type(config).__name__}.")
        store = Store(self.store or tempfile.mkdtemp(prefix="sisa-ray-"))
        if not store.exists(STORE_META) and not store.is_empty():
            raise ValueError(
                f"The store {store.location} is not empty and holds no sisa-ray ensemble. "
                "Choose an empty or new directory for --store."
            )
        with store.writer_lock():
            return self._fit_locked(store, config, data, test, progress)

    def _fit_locked(self, store: Store, config: SISAConfig, data: SampleSet,
                    test: SampleSet | None, progress) -> SISAEnsemble:
        fingerprint = data.fingerprint()
        meta = {
            "format": 1,
            "config": config.to_dict(),
            "config_hash": config.config_hash(),
            "dataset": {
                "name": data.name, "n_classes": data.n_classes, "task": data.task,
                "input_shape": list(data.input_shape), "n_train": len(data),
                "n_test": 0 if test is None else len(test), "fingerprint": fingerprint,
            },
        }
        if store.exists(STORE_META):
            old = store.read_json(STORE_META)
            if old.get("config_hash") != meta["config_hash"]:
                raise ValueError(
                    f"The store {store.location} holds an ensemble trained with another config "
                    f"(hash {old.get('config_hash')}, this one {meta['config_hash']}). Use a new "
                    "--store, or the same config to resume."
                )
            if old["dataset"].get("fingerprint") != fingerprint:
                raise ValueError(
                    f"The store {store.location} holds an ensemble trained on other data "
                    f"(fingerprint {old['dataset'].get('fingerprint')}, this data {fingerprint}). "
                    "Use a new --store for new data."
                )
            if read_manifest(store) is not None:
                log.info("store %s already trained; opening it", store.location)
                self._attach(store)
                self._recover(progress)
                return self
        elif not store.is_empty():
            raise ValueError(
                f"The store {store.location} is not empty and holds no sisa-ray ensemble. "
                "Choose an empty or new directory for --store."
            )
        else:
            store.write_json(STORE_META, meta)
        if test is not None:
            store.write_table(TEST_DATA, test.to_arrow())

        plan = ShardPlan.build(data.ids, config.sharding)
        jobs = []
        for s in range(config.sharding.n_shards):
            blob = _parquet_bytes(data.select_ids(plan.shard_ids(s)).to_arrow())
            ref = FileRef(f"{shard_dir(s, 1)}/data.parquet", sha256(blob))
            store.write_bytes(ref.path, blob)
            jobs.append(TrainJob(shard=s, version=1, data=ref.to_dict()))

        self.store_, self.config_ = store, config
        self.meta_ = meta
        self._bind()
        t0 = time.perf_counter()
        results = self._executor().run_jobs(jobs, progress)
        self.fit_seconds_ = time.perf_counter() - t0
        self.fit_results_ = results
        manifest = Manifest(
            generation=1, config_hash=meta["config_hash"], data_fingerprint=fingerprint,
            shards=[ShardEntry.from_dict(r["entry"]) for r in results],
        )
        write_manifest(store, manifest)
        collect_garbage(store, manifest)
        self.manifest_ = manifest
        self._executor().reload()
        self.classes_ = np.arange(data.n_classes)
        return self

    @classmethod
    def open(
        cls, store: str, *, backend: str = "ray", resources: ResourceConfig | None = None,
        address: str | None = None, vote: str = "hard", executor=None, recover: bool = True,
        progress=None,
    ) -> SISAEnsemble:
        """Open a trained store and finish any acknowledged but incomplete deletion."""
        ens = cls(
            None, store=store, backend=backend, resources=resources, address=address,
            vote=vote, executor=executor,
        )
        st = Store(store)
        meta = read_store_meta(st)
        ens.config = SISAConfig.from_dict(meta["config"])
        ens._attach(st)
        if recover:
            ens._recover(progress)
        return ens

    def _attach(self, store: Store) -> None:
        meta = read_store_meta(store)
        manifest = read_manifest(store)
        if manifest is None:
            raise StoreError(
                f"Training of the ensemble at {store.location} did not finish. Run the same "
                f"`sisa-ray train --store {store.location} ...` again to resume it."
            )
        self.store_, self.meta_ = store, meta
        self.config_ = SISAConfig.from_dict(meta["config"])
        if manifest.config_hash != meta["config_hash"]:
            raise StoreError(
                f"{store.location}: manifest config {manifest.config_hash} does not match "
                f"store.json {meta['config_hash']}. The store mixes two trainings."
            )
        self.manifest_ = manifest
        self.classes_ = np.arange(int(meta["dataset"]["n_classes"]))

    def _recover(self, progress=None) -> list[UnlearnReport]:
        """Finish acknowledged deletions, then remove files no manifest references."""
        with self.store_.writer_lock():
            return self._recover_locked(progress)

    def _recover_locked(self, progress=None) -> list[UnlearnReport]:
        self.manifest_ = read_manifest(self.store_)  # another writer may have moved it on
        reports = []
        for req in Ledger(self.store_).pending():
            log.warning("finishing acknowledged deletion request %s", req.request_id)
            reports.append(self._apply(req.request_id, np.asarray(req.ids, np.int64), progress))
        collect_garbage(self.store_, self.manifest_)
        self._bind()
        self._executor().reload()
        return reports

    # -- prediction --------------------------------------------------------------------------------

    def shard_proba(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each shard's probabilities, shape (S, N, C), and the mask of voting shards."""
        self._check_fitted()
        features = self._check_features(features)
        outs = self._executor().predict_proba(features)
        n_classes = len(self.classes_)
        probs = np.zeros((len(outs), features.shape[0], n_classes))
        active = np.zeros(len(outs), dtype=bool)
        for s, p in enumerate(outs):
            if p is not None:
                probs[s], active[s] = p, True
        return probs, active

    def _check_features(self, features) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        shape = tuple(self.meta_["dataset"]["input_shape"])
        if x.ndim >= 1 and x.shape[1:] != shape:
            flat = int(np.prod(shape))
            if x.ndim == 2 and x.shape[1] == flat:
                x = x.reshape((x.shape[0], *shape))
            else:
                raise ValueError(
                    f"Features have shape {x.shape[1:]} per sample; this ensemble was trained on "
                    f"{shape} (or {flat} flat values). Give features in the training format."
                )
        if not np.isfinite(x).all():
            raise ValueError("Features contain NaN or infinite values; clean them first.")
        return x

    @property
    def task_(self) -> str:
        self._check_fitted()
        return self.meta_["dataset"].get("task", "classification")

    def predict_proba(self, features: np.ndarray, vote: str | None = None) -> np.ndarray:
        if self.task_ == "regression":
            raise ValueError("predict_proba is for classification; this ensemble does "
                             "regression. Use predict().")
        probs, active = self.shard_proba(features)
        return aggregate(probs, active, vote or self.vote)[1]

    def predict(self, features: np.ndarray, vote: str | None = None) -> np.ndarray:
        """Classes by majority (``vote="hard"``) or soft vote; for regression the mean (default)
        or ``vote="median"`` of the shards' predictions."""
        probs, active = self.shard_proba(features)
        if self.task_ == "regression":
            how = vote if vote in ("mean", "median") else (
                self.vote if self.vote in ("mean", "median") else "mean")
            return aggregate_regression(probs, active, how)
        return aggregate(probs, active, vote or self.vote)[0]

    def score(self, data: SampleSet, vote: str | None = None) -> float:
        """Accuracy (classification) or mean absolute error (regression)."""
        pred = self.predict(data.features, vote)
        if self.task_ == "regression":
            return float(np.abs(pred - data.labels).mean())
        return float((pred == data.labels).mean())

    def test_data(self) -> SampleSet | None:
        self._check_fitted()
        if not self.store_.exists(TEST_DATA):
            return None
        return SampleSet.from_arrow(self.store_.read_table(TEST_DATA))

    # -- deletion ----------------------------------------------------------------------------------

    def _shard_ids(self, shard: int) -> np.ndarray:
        entry = self.manifest_.shards[shard]
        table = self.store_.read_table(entry.data.path)
        return table.column("id").to_numpy().astype(np.int64)

    def unlearn(self, ids, request_id: str | None = None, progress=None) -> UnlearnReport:
        """Delete samples exactly: retrain only the affected shards from their last clean slice.

        Unknown ids raise ``ValueError`` listing them, with nothing changed. Ids deleted earlier
        are reported in ``already_deleted``. A request id seen before is not applied twice.
        """
        self._check_fitted()
        ids = validate_ids(ids)
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise ValueError(f"request_id must be a non-empty string. Got {request_id!r}.")
        with self.store_.writer_lock():
            return self._unlearn_locked(ids, request_id, progress)

    def _unlearn_locked(self, ids: np.ndarray, request_id: str | None, progress):
        self._recover_locked(progress)
        rid = request_id or _default_request_id(ids)
        ledger = Ledger(self.store_)
        known = ledger.requests()
        if rid in known:
            prev = known[rid]
            if sorted(prev.ids) != ids.tolist():
                raise ValueError(
                    f"Request id {rid!r} was already used for other ids ({len(prev.ids)} ids). "
                    "Use a new request id for a new request."
                )
            report = UnlearnReport.from_dict(prev.report)
            report.duplicate_request = True
            return report
        deleted = np.asarray(self.manifest_.deleted_ids, dtype=np.int64)
        fresh = ids[~np.isin(ids, deleted)]
        shard_of, _ = assign(fresh, self.config_.sharding)
        unknown: list[int] = []
        for s in np.unique(shard_of):
            cand = fresh[shard_of == s]
            unknown.extend(cand[~np.isin(cand, self._shard_ids(int(s)))].tolist())
        if unknown:
            raise ValueError(
                f"{len(unknown)} id(s) were never trained on in this store: {sorted(unknown)[:20]}"
                f"{' ...' if len(unknown) > 20 else ''}. Nothing was deleted. Check the ids "
                "against your data's 'id' column and send the request again without them."
            )
        self._check_restart_points(fresh)
        ledger.acknowledge(rid, ids.tolist())
        return self._apply(rid, ids, progress)

    def _check_restart_points(self, ids: np.ndarray) -> None:
        """Check the files a deletion of ``ids`` will start from, before acknowledging it."""
        plan = DeletionPlan.build(ids, self.config_.sharding)
        for s, k in plan.restart_slice.items():
            entry = self.manifest_.shards[s]
            for ref in [entry.data, *entry.checkpoints[:k]]:
                if sha256(self.store_.read_bytes(ref.path)) != ref.sha256:
                    raise StoreError(
                        f"'{self.store_.location}/{ref.path}' is corrupt: its SHA-256 does not "
                        "match the manifest (truncated or altered). Nothing was deleted. Restore "
                        "the file from backup, or retrain on a new --store."
                    )

    def _apply(self, rid: str, ids: np.ndarray, progress=None) -> UnlearnReport:
        t0 = time.perf_counter()
        manifest = read_manifest(self.store_)
        ledger = Ledger(self.store_)
        cfg = self.config_
        if rid in manifest.applied_requests:  # crashed after the swap, before the ledger entry
            prev = self._report_from_manifest(rid, ids, manifest)
            ledger.complete(rid, prev.to_dict())
            self.manifest_ = manifest
            return prev
        already = ids[np.isin(ids, manifest.deleted_ids)]
        to_delete = ids[~np.isin(ids, manifest.deleted_ids)]
        plan = DeletionPlan.build(to_delete, cfg.sharding)
        shard_of, _ = assign(to_delete, cfg.sharding)
        jobs = []
        for s, k in plan.restart_slice.items():
            entry = manifest.shards[s]
            jobs.append(TrainJob(
                shard=s, version=entry.version + 1, data=entry.data.to_dict(), start_step=k,
                base_checkpoints=[c.to_dict() for c in entry.checkpoints[:k]],
                remove_ids=to_delete[shard_of == s].tolist(),
            ))
        self._bind()
        results = self._executor().run_jobs(jobs, progress) if jobs else []
        new = manifest.copy()
        new.generation += 1
        for r in results:
            entry = ShardEntry.from_dict(r["entry"])
            new.shards[entry.shard] = entry
        new.applied_requests.append(rid)
        new.deleted_ids = sorted(set(new.deleted_ids) | set(to_delete.tolist()))
        epochs = epochs_per_step(cfg.training, cfg.sharding.n_slices)
        report = UnlearnReport(
            request_id=rid, ids=ids.tolist(), deleted=to_delete.tolist(),
            already_deleted=already.tolist(),
            shards=[
                ShardRetrain(
                    shard=j.shard, restart_slice=j.start_step, deleted=len(j.remove_ids),
                    sample_steps=r["sample_steps"], seconds=r["seconds"],
                    train_seconds=r["train_seconds"],
                )
                for j, r in zip(jobs, results)
            ],
            retrained_sample_steps=sum(r["sample_steps"] for r in results),
            full_retrain_sample_steps=sum(
                sample_steps(np.asarray(e.slice_counts), epochs) for e in new.shards
            ),
            wall_seconds=0.0,
        )
        write_manifest(self.store_, new)  # the deletion is live from here on
        self.manifest_ = new
        report.wall_seconds = time.perf_counter() - t0
        ledger.complete(rid, report.to_dict())
        collect_garbage(self.store_, new)
        self._executor().reload()
        return report

    def _report_from_manifest(self, rid: str, ids: np.ndarray, manifest: Manifest):
        """Report of a request whose manifest swap landed before a crash: its ids are deleted;
        which shards it retrained is not recorded anywhere durable, so that part is empty."""
        return UnlearnReport(
            request_id=rid, ids=ids.tolist(), deleted=ids.tolist(), already_deleted=[],
            shards=[], retrained_sample_steps=0, full_retrain_sample_steps=0, wall_seconds=0.0,
        )

    # -- inspection --------------------------------------------------------------------------------

    def retained_data(self) -> SampleSet:
        """The training samples the live models were trained on (all shards' data)."""
        self._check_fitted()
        parts = [self.store_.read_table(e.data.path) for e in self.manifest_.shards]
        table = pa.concat_tables(parts)
        table = table.replace_schema_metadata(parts[0].schema.metadata)
        return SampleSet.from_arrow(table)

    def shard_states(self, all_steps: bool = False) -> list:
        """Model state dicts read from the live checkpoints (last step, or every step)."""
        self._check_fitted()
        return load_states(self.store_, self.manifest_, all_steps)

    def status(self) -> dict:
        self._check_fitted()
        m = self.manifest_
        return {
            "store": self.store_.location,
            "config": self.config_.to_dict(),
            "config_hash": self.meta_["config_hash"],
            "dataset": self.meta_["dataset"],
            "generation": m.generation,
            "n_train_live": sum(e.n_samples for e in m.shards),
            "deleted_ids": len(m.deleted_ids),
            "shards": [
                {"shard": e.shard, "n_samples": e.n_samples, "version": e.version,
                 "slice_counts": e.slice_counts, "checkpoints": len(e.checkpoints),
                 "abstains": e.n_samples == 0}
                for e in m.shards
            ],
            "ledger": Ledger(self.store_).summary(),
        }

    def verify(self, work_store: str | None = None, progress=None) -> VerifyReport:
        """Retrain from scratch on the retained data, same config, and compare bit for bit.

        Every slice checkpoint of every shard is compared, and the predictions on the stored
        test split (when there is one). ``work_store`` is where the scratch ensemble is trained
        (a temporary directory by default; on a cluster give shared storage).
        """
        self._check_fitted()
        t0 = time.perf_counter()
        retained = self.retained_data()
        retained = SampleSet(
            ids=retained.ids, features=retained.features, labels=retained.labels,
            n_classes=retained.n_classes, name=self.meta_["dataset"]["name"], task=retained.task,
        )
        tmp = None
        if work_store is None:
            tmp = tempfile.TemporaryDirectory(prefix="sisa-ray-verify-")
            work_store = f"{tmp.name}/{uuid.uuid4().hex[:8]}"
        try:
            fresh = SISAEnsemble(
                self.config_, store=work_store, backend=self.backend,
                resources=self.resources, address=self.address,
            ).fit(retained, progress=progress)
            mine = load_states(self.store_, self.manifest_, all_steps=True)
            theirs = load_states(fresh.store_, fresh.manifest_, all_steps=True)
            shards = []
            for s, (a, b) in enumerate(zip(mine, theirs)):
                diffs = [
                    {"step": step, "tensors": states_identical(x, y)}
                    for step, (x, y) in enumerate(zip(a, b))
                ]
                diffs = [d for d in diffs if d["tensors"]]
                same = not diffs and len(a) == len(b)
                shards.append({"shard": s, "identical": same, "steps": len(a), "diffs": diffs})
            test = self.test_data()
            preds_same = None
            if test is not None and len(test) and self.manifest_.shards:
                p1, a1 = self.shard_proba(test.features)
                p2, a2 = fresh.shard_proba(test.features)
                preds_same = bool(np.array_equal(p1, p2) and np.array_equal(a1, a2))
            fresh._executor().shutdown()
        finally:
            if tmp is not None:
                tmp.cleanup()
        identical = all(s["identical"] for s in shards) and preds_same is not False
        return VerifyReport(identical, shards, preds_same, time.perf_counter() - t0)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()


def load_states(store: Store, manifest: Manifest, all_steps: bool = False) -> list:
    """Model states per shard from a store's live checkpoints."""
    out = []
    for e in manifest.shards:
        refs = e.checkpoints if all_steps else e.checkpoints[-1:]
        states = [
            Checkpoint.from_bytes(
                store.read_bytes(r.path), where=f"{store.location}/{r.path}",
                expected_sha256=r.sha256, expected_config_hash=manifest.config_hash,
            ).model_state
            for r in refs
        ]
        out.append(states if all_steps else states[0])
    return out
