"""``SISAEnsemble``: the scikit-learn style facade of the exact path.

>>> ens = SISAEnsemble(config, store="/data/sisa").fit(train)      # doctest: +SKIP
>>> ens.predict(test.features)                                      # doctest: +SKIP
>>> report = ens.unlearn([3, 17, 42])                               # doctest: +SKIP

The facade stays thin: the deletion protocol lives in :mod:`sisa_ray.deletion`, the ledger, the
manifest and the store in :mod:`sisa_ray.core`. Reads never take the writer lock: ``predict`` and
``status`` read the live manifest (and notice a newer generation before answering), so they keep
working while a writer retrains.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from .core.aggregation import aggregate, aggregate_regression
from .core.config import ResourceConfig, SISAConfig
from .core.data import SampleSet
from .core.jobs import TrainJob
from .core.ledger import Ledger
from .core.manifest import (
    STORE_FORMAT,
    STORE_META,
    TEST_DIR,
    FileRef,
    Manifest,
    ShardEntry,
    collect_garbage,
    live_generation,
    read_manifest,
    read_store_meta,
    shard_dir,
    write_manifest,
)
from .core.plan import (
    PLACEMENT_FILE,
    ShardPlan,
    assign,
    ids_digest,
    load_placement,
    placement_table,
)
from .core.runtime import current_cpu_capability, pinned_env
from .core.store import LockTimeout, Store, StoreError
from .deletion import (
    DeletionContext,
    ShardRetrain,
    UnlearnReport,
    read_test_split,
    resurrected,
    validate_ids,
)
from .deletion import recover as recover_requests
from .deletion import unlearn as unlearn_request
from .ingest import STAGING_DIR, ParquetSource, assemble_shard, combine, partition_part
from .transfer import BACKBONE_FILE, TransferSetup, refuse_public_request

log = logging.getLogger(__name__)

__all__ = ["NotFittedError", "SISAEnsemble", "ShardRetrain", "UnlearnReport", "VerifyReport",
           "validate_ids", "load_states"]


class NotFittedError(RuntimeError):
    """The ensemble has no trained state yet."""


@dataclass
class VerifyReport:
    identical: bool
    shards: list[dict] = field(default_factory=list)
    predictions_identical: bool | None = None
    seconds: float = 0.0
    resurrected_ids: list[int] = field(default_factory=list)
    work_store: str | None = None  # where the scratch copy was trained (gone afterwards)

    def to_dict(self) -> dict:
        return asdict(self)


class SISAEnsemble:
    """An exactly-unlearnable ensemble of shard models (Bourtoule et al., "Machine Unlearning",
    IEEE S&P 2021). Shards train and predict on a pool of Ray workers (actors), each hosting
    many shards (see :mod:`sisa_ray.executor`), or in this process.

    Parameters
    ----------
    config : SISAConfig, the sharding and training configuration.
    store : local path or ``pyarrow.fs`` URI where data, checkpoints, manifest and ledger live.
        A fresh temporary directory when None.
    backend : ``"ray"`` (a pool of Ray workers; default) or ``"local"`` (in-process, no Ray).
    resources : what each worker reserves (Ray backend only).
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
        backbone: str | bytes | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.backend = backend
        self.resources = resources
        self.address = address
        self.vote = vote
        self.executor = executor
        self.backbone = backbone

    # -- plumbing ----------------------------------------------------------------------------------

    def _executor(self):
        if self.executor is None:
            from .executor import make_executor

            self.executor = make_executor(self.backend, self.resources, self.address)
        return self.executor

    def _prepare(self, shards=None) -> None:
        """Start (or find) the workers, pinned to the store's runtime. Workers on a node that
        cannot honour it refuse here, before a deletion is acknowledged."""
        cfg = self.config_
        self._executor().bind(self.store_.uri, cfg.sharding.n_shards, cfg.training.threads,
                              env=pinned_env(cfg.training), config_hash=self.meta_["config_hash"])

    def _context(self) -> DeletionContext:
        return DeletionContext(self.store_, self.config_, self._executor(), self._prepare,
                               self._ledger())

    def _ledger(self) -> Ledger:
        """One ledger reader per handle: it reads the checkpoint once, then only newer events."""
        if getattr(self, "_ledger_obj", None) is None or self._ledger_obj.store is not self.store_:
            self._ledger_obj = Ledger(self.store_)
        return self._ledger_obj

    def _check_fitted(self) -> None:
        if not hasattr(self, "manifest_"):
            raise NotFittedError(
                "This SISAEnsemble is not fitted yet. Call fit(data) first, or "
                "SISAEnsemble.open(store) for a store trained earlier."
            )

    # -- training ----------------------------------------------------------------------------------

    def fit(self, data: SampleSet | ParquetSource, test: SampleSet | None = None,
            progress=None) -> SISAEnsemble:
        """Train every shard, slice by slice, in parallel; checkpoint after each slice.

        ``data`` is a :class:`SampleSet` in memory, or a :class:`~sisa_ray.ingest.ParquetSource`
        that parallel tasks shard without the driver ever loading it. On a store that already
        holds this config and data, training resumes (finished stores are left as they are). A
        store holding another config or data is refused unchanged, unless its training never
        finished: nothing was ever live there, so it starts over.
        """
        if not isinstance(data, (SampleSet, ParquetSource)):
            raise TypeError(
                "fit expects a SampleSet or a ParquetSource (see sisa_ray.datasets, "
                f"sisa_ray.ingest). Got {type(data).__name__}."
            )
        if isinstance(data, SampleSet) and len(data) == 0:
            raise ValueError("fit got an empty training set; give at least one sample.")
        config = self.config or SISAConfig()
        if not isinstance(config, SISAConfig):
            raise TypeError(f"config must be a SISAConfig. Got {type(config).__name__}.")
        config, self._transfer = TransferSetup.bind(config, self.backbone)
        if config.sharding.placement != "hash" and isinstance(data, ParquetSource):
            raise ValueError("A deletion-aware placement needs the training data in memory: "
                             "load it with sisa_ray.datasets.read_parquet and fit that.")
        store = Store(self.store or tempfile.mkdtemp(prefix="sisa-ray-"))
        store.check_usable()
        if store.read_optional(STORE_META) is None and not store.is_empty():
            raise ValueError(
                f"The store {store.location} is not empty and holds no sisa-ray ensemble. "
                "Choose an empty or new directory for --store."
            )
        if isinstance(data, SampleSet):
            config = config.resolve(n_classes=data.n_classes, input_shape=data.input_shape,
                                    cpu_capability=current_cpu_capability())
            check_data(config, data, "the training set")
            check_slices(config, len(data))
            self._check_test(config, test, data.task)
            desc = {"name": data.name, "task": data.task, "rows": len(data),
                    "fingerprint": data.fingerprint()}

            def shard_jobs(store: Store) -> list[TrainJob]:
                # each worker writes the file of the shard it trains (see TrainJob.rows)
                plan = ShardPlan.build(data.ids, config.sharding)
                return [TrainJob(shard=s, version=1,
                                 data={"path": f"{shard_dir(s, 1)}/data.parquet", "sha256": ""},
                                 rows=data.select_ids(plan.shard_ids(s)).to_arrow())
                        for s in range(config.sharding.n_shards)]

            with store.writer_lock() as lock:
                return self._fit_locked(store, config, desc, shard_jobs, test, lock, progress)
        with store.writer_lock() as lock:
            staging = uuid.uuid4().hex[:12]
            try:
                return self._fit_parquet(store, config, data, test, staging, lock, progress)
            finally:
                for rel in store.list(f"{STAGING_DIR}/{staging}"):
                    store.delete(rel)

    def _fit_parquet(self, store: Store, config: SISAConfig, source: ParquetSource,
                     test: SampleSet | None, staging: str, lock, progress) -> SISAEnsemble:
        calls = [dict(source=source, file=f, row_group=g, part=i,
                      sharding=asdict(config.sharding), store_uri=store.uri, staging=staging)
                 for i, (f, g) in enumerate(source.parts())]
        ds = combine(self._executor().run_tasks(partition_part, calls), source)
        if ds["rows"] == 0:
            raise ValueError(f"{source.uri} has no rows; give at least one sample.")
        check_slices(config, ds["rows"])
        config = config.resolve(n_classes=ds["n_classes"], input_shape=ds["input_shape"],
                                cpu_capability=current_cpu_capability())
        t = config.training
        if tuple(ds["input_shape"]) != tuple(t.input_shape) or (
                ds["task"] == "classification" and ds["n_classes"] > t.n_classes):
            raise ValueError(
                f"{source.uri} has samples of shape {ds['input_shape']} and "
                f"{ds['n_classes']} classes, but the model takes {t.input_shape} and "
                f"{t.n_classes} classes. Give matching data or --n-classes."
            )
        self._check_test(config, test, ds["task"])
        desc = {"name": source.label, "task": ds["task"], "rows": ds["rows"],
                "fingerprint": ds["fingerprint"]}

        def shard_jobs(store: Store) -> list[TrainJob]:
            calls = [dict(store_uri=store.uri, staging=staging, shard=s, version=1,
                          n_classes=t.n_classes, input_shape=list(t.input_shape),
                          task=ds["task"], name=source.label)
                     for s in range(config.sharding.n_shards)]
            out = self._executor().run_tasks(assemble_shard, calls)
            return [TrainJob(shard=s, version=1, data=r["data"]) for s, r in enumerate(out)]

        return self._fit_locked(store, config, desc, shard_jobs, test, lock, progress)

    @staticmethod
    def _check_test(config: SISAConfig, test: SampleSet | None, task: str) -> None:
        if test is None:
            return
        if test.task != task:
            raise ValueError(f"The test set is {test.task} but the training set is {task}; "
                             "they must match.")
        check_data(config, test, "the test set")

    def _fit_locked(self, store: Store, config: SISAConfig, desc: dict, shard_jobs,
                    test: SampleSet | None, lock, progress) -> SISAEnsemble:
        fingerprint = desc["fingerprint"]
        t = config.training
        meta = {
            "format": STORE_FORMAT,
            "config": config.to_dict(),
            "config_hash": config.config_hash(),
            "dataset": {
                "name": desc["name"], "n_classes": t.n_classes, "task": desc["task"],
                "input_shape": list(t.input_shape), "n_train": desc["rows"],
                "n_test": 0 if test is None else len(test), "fingerprint": fingerprint,
            },
        }
        if store.read_optional(STORE_META) is not None:
            old = read_store_meta(store)
            if read_manifest(store) is not None:
                if old["config_hash"] != meta["config_hash"]:
                    raise ValueError(
                        f"The store {store.location} holds an ensemble trained with another "
                        f"config (hash {old['config_hash']}, this one {meta['config_hash']}). "
                        "Use a new --store, or the same config to resume."
                    )
                if old["dataset"].get("fingerprint") != fingerprint:
                    raise ValueError(
                        f"The store {store.location} holds an ensemble trained on other data "
                        f"(fingerprint {old['dataset'].get('fingerprint')}, this data "
                        f"{fingerprint}). Use a new --store for new data."
                    )
                log.info("store %s already trained; opening it", store.location)
                self._attach(store)
                self._run_recovery(lock, progress)
                return self
            if old["config_hash"] != meta["config_hash"] or \
                    old["dataset"].get("fingerprint") != fingerprint:
                log.warning("training of %s never finished; starting over with this config",
                            store.location)
            for rel in store.list(""):  # nothing was ever live: clear the unfinished attempt
                if rel != ".lock" and not rel.startswith(f"{STAGING_DIR}/"):
                    store.delete(rel)
        store.write_json(STORE_META, meta)
        if config.sharding.placement != "hash":
            store.write_table(PLACEMENT_FILE, placement_table(config.sharding))
        transfer = getattr(self, "_transfer", None)
        if transfer is not None:
            transfer.write(store)
        test_ref = None
        if test is not None:  # versioned like shard data: a deletion writes a new one
            rel = f"{TEST_DIR}/g{1:010d}-{uuid.uuid4().hex[:8]}.parquet"
            test_ref = FileRef(rel, store.write_table(rel, test.to_arrow()))
        jobs = shard_jobs(store)
        if transfer is not None:
            transfer.refuse_sharded_public(store, jobs)
        # the largest shards first, so the last job to finish is a small one
        sizes = {j.shard: j.size(store) for j in jobs}
        jobs.sort(key=lambda j: -sizes[j.shard])

        self.store_, self.config_ = store, config
        self.meta_ = meta
        self._prepare()
        t0 = time.perf_counter()
        results = self._executor().run_jobs(jobs, progress)
        self.fit_seconds_ = time.perf_counter() - t0
        results = sorted(results, key=lambda r: r["entry"]["shard"])
        self.fit_results_ = results
        manifest = Manifest(
            generation=1, config_hash=meta["config_hash"], data_fingerprint=fingerprint,
            shards=[ShardEntry.from_dict(r["entry"]) for r in results], token=lock.token,
            test=test_ref,
        )
        write_manifest(store, manifest, lock)
        collect_garbage(store, manifest)
        self._attach(store)
        return self

    @classmethod
    def open(
        cls, store: str, *, backend: str = "ray", resources: ResourceConfig | None = None,
        address: str | None = None, vote: str = "hard", executor=None, recover: bool = True,
        progress=None,
    ) -> SISAEnsemble:
        """Open a trained store. Starts no worker; workers start when a command needs them.

        With ``recover`` (the default), acknowledged but unfinished deletions are finished, and
        deleted ids that came back (a restored backup) are deleted again, if no other writer is
        at work (that writer finishes them); ``open`` never waits for a writer.
        """
        ens = cls(
            None, store=store, backend=backend, resources=resources, address=address,
            vote=vote, executor=executor,
        )
        st = Store(store)
        st.check_usable()
        ens._attach(st)
        ens.config = ens.config_
        if recover and (ens.pending_ or ens.resurrected_):
            try:
                with st.writer_lock(timeout=0) as lock:
                    ens._run_recovery(lock, progress)
            except LockTimeout:
                log.info("another writer is at work on %s; serving the live state",
                         st.location)
        return ens

    def _attach(self, store: Store) -> None:
        """Read the live state (metadata, manifest, what the ledger says is outstanding)."""
        meta = read_store_meta(store)
        manifest = read_manifest(store)
        if manifest is None:
            raise StoreError(
                f"Training of the ensemble at {store.location} did not finish. Run the same "
                f"`sisa-ray train --store {store.location} ...` again to resume it."
            )
        self.store_, self.meta_ = store, meta
        self.config_ = SISAConfig.from_dict(meta["config"])
        if self.config_.sharding.placement != "hash":
            load_placement(store.read_table(PLACEMENT_FILE), self.config_.sharding)
        if manifest.config_hash != meta["config_hash"]:
            raise StoreError(
                f"{store.location}: manifest config {manifest.config_hash} does not match "
                f"store.json {meta['config_hash']}. The store mixes two trainings."
            )
        self.manifest_ = manifest
        self.classes_ = np.arange(self.config_.training.n_classes)
        ctx = self._context_readonly()
        self.pending_ = [r.request_id for r in ctx.ledger.pending()]
        self.resurrected_ = resurrected(ctx, manifest).tolist()

    def _context_readonly(self) -> DeletionContext:
        return DeletionContext(self.store_, self.config_, None, None, self._ledger())

    def recover(self, progress=None) -> list[UnlearnReport]:
        """Finish acknowledged deletions and re-delete ids that came back; waits for the lock."""
        self._check_fitted()
        with self.store_.writer_lock() as lock:
            return self._run_recovery(lock, progress)

    def _run_recovery(self, lock, progress=None) -> list[UnlearnReport]:
        reports = recover_requests(self._context(), lock, progress)
        self._attach(self.store_)
        return reports

    # -- prediction --------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Reload if another handle or process made a newer generation live; return whether it
        did. Costs one read of the small manifest pointer."""
        self._check_fitted()
        if live_generation(self.store_) == self.manifest_.generation:
            return False
        self._attach(self.store_)  # workers are asked by checkpoint: they cannot serve stale
        return True

    def shard_proba(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each shard's probabilities, shape (S, N, C), and the mask of voting shards."""
        self._check_fitted()
        features = self._check_features(features)
        self.refresh()
        if self.resurrected_:
            raise StoreError(
                f"{self.store_.location}: ids {self.resurrected_[:20]} were deleted (the ledger "
                "says so) but are live again, e.g. after a restore from backup. Refusing to "
                "predict with them. Run `sisa-ray recover --store ...` to delete them again."
            )
        self._prepare()
        outs = self._executor().predict_proba(
            features, [e.to_dict() for e in self.manifest_.shards])
        n_classes = len(self.classes_)
        probs = np.zeros((len(outs), features.shape[0], n_classes))
        active = np.zeros(len(outs), dtype=bool)
        for s, p in enumerate(outs):
            if p is not None:
                probs[s], active[s] = p, True
        return probs, active

    def _check_features(self, features) -> np.ndarray:
        shape = tuple(self.config_.training.input_shape)
        flat = int(np.prod(shape))
        try:
            x = np.asarray(features, dtype=np.float32)
        except ValueError as e:  # ragged nested lists
            raise ValueError(
                f"Features must be an array of rows of {flat} values; got rows of different "
                f"lengths ({e})."
            ) from None
        if x.ndim >= 1 and x.shape[1:] != shape:
            if x.ndim == 2 and x.shape[1] == flat:
                x = x.reshape((x.shape[0], *shape))
            else:
                raise ValueError(
                    f"Features have shape {x.shape[1:]} per sample; this ensemble was trained on "
                    f"{shape} (or {flat} flat values). Give features in the training format."
                )
        if x.ndim == 0:
            raise ValueError("Features must be an array of samples, not a scalar.")
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
        """The stored test split (given to ``fit``), less every id deleted since; None if none."""
        self._check_fitted()
        table = read_test_split(self.store_, self.manifest_)
        return None if table is None else SampleSet.from_arrow(table)

    # -- deletion ----------------------------------------------------------------------------------

    def unlearn(self, ids, request_id: str | None = None, progress=None) -> UnlearnReport:
        """Delete samples exactly: retrain only the affected shards from their last clean slice.

        Unknown ids raise ``ValueError`` listing them, with nothing changed. Ids deleted earlier
        are reported in ``already_deleted``. A request id seen before is not applied twice.
        """
        self._check_fitted()
        ids = validate_ids(ids)
        refuse_public_request(self.store_, self.config_, ids)
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise ValueError(f"request_id must be a non-empty string. Got {request_id!r}.")
        with self.store_.writer_lock() as lock:
            try:
                return unlearn_request(self._context(), ids, request_id, lock, progress)
            finally:
                self._attach(self.store_)

    def abandon(self, request_id: str, reason: str) -> None:
        """Give up a pending request whose retrain cannot run: the ledger records it as
        abandoned with ``reason`` and its ids stay in the models. The operator's way out of a
        store whose acknowledged request keeps failing; the ids can be sent again later."""
        self._check_fitted()
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("Give a reason for abandoning the request (it goes in the ledger).")
        with self.store_.writer_lock() as lock:
            ledger = Ledger(self.store_)
            req = ledger.state().requests.get(request_id)
            if req is None or req.status != "pending":
                pending = [r.request_id for r in ledger.pending()]
                raise ValueError(
                    f"Request {request_id!r} is {'unknown' if req is None else req.status}; only "
                    f"pending requests can be abandoned. Pending: {pending or 'none'}."
                )
            ledger.abandon(request_id, reason, lock)
        self._attach(self.store_)

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
        """The live state, read from the store alone: no worker is started."""
        self._check_fitted()
        m = self.manifest_
        ledger = self._ledger()
        return {
            "store": self.store_.location,
            "config": self.config_.to_dict(),
            "config_hash": self.meta_["config_hash"],
            "dataset": self.meta_["dataset"],
            "generation": m.generation,
            "n_train_live": sum(e.n_samples for e in m.shards),
            "n_test_live": self._n_test_live(),
            "deleted_ids": len(ledger.deleted_ids()),
            "pending_requests": self.pending_,
            "resurrected_ids": self.resurrected_,
            "shards": [
                {"shard": e.shard, "n_samples": e.n_samples, "version": e.version,
                 "slice_counts": e.slice_counts, "checkpoints": len(e.checkpoints),
                 "abstains": e.n_samples == 0}
                for e in m.shards
            ],
            "ledger": ledger.summary(),
        }

    def _n_test_live(self) -> int | None:
        """Rows of the stored test split; None when there is none."""
        table = read_test_split(self.store_, self.manifest_, columns=[])
        return None if table is None else table.num_rows

    def verify(self, work_store: str | None = None, progress=None) -> VerifyReport:
        """Check the store against the ledger, retrain from scratch on the retained data with the
        same config, and compare bit for bit.

        Every id the ledger calls deleted must be absent from every shard's data, and every
        checkpoint must have seen exactly the retained ids of its slices; then every slice
        checkpoint of every shard is compared with a fresh fit, and the predictions on the stored
        test split (when there is one). ``work_store`` is where the scratch ensemble is trained:
        by default a temporary directory when every worker runs on this machine (``backend``
        local, or a Ray instance of its own), and a scratch store beside the store itself
        (``<store>.verify-<id>``, removed afterwards) when the workers run on a cluster
        (``address`` or ``RAY_ADDRESS``), since a driver's temporary directory is not where workers on other
        nodes can write.
        """
        from .core.checkpoint import states_identical

        self._check_fitted()
        self.refresh()
        t0 = time.perf_counter()
        back = resurrected(self._context_readonly(), self.manifest_, everything=True).tolist()
        retained = self.retained_data()
        retained = SampleSet(
            ids=retained.ids, features=retained.features, labels=retained.labels,
            n_classes=self.config_.training.n_classes, name=self.meta_["dataset"]["name"],
            task=retained.task,
        )
        from .executor import joins_cluster

        tmp = scratch = None
        if work_store is None and self.backend == "ray" and joins_cluster(self.address):
            scratch = Store(self.store_.beside(f".verify-{uuid.uuid4().hex[:8]}"))
            work_store = scratch.uri
        elif work_store is None:
            tmp = tempfile.TemporaryDirectory(prefix="sisa-ray-verify-")
            work_store = f"{tmp.name}/{uuid.uuid4().hex[:8]}"
        try:
            fresh = SISAEnsemble(
                self.config_, store=work_store, backbone=self.store_.read_bytes(BACKBONE_FILE)
                if self.config_.training.backbone else None, backend=self.backend,
                resources=self.resources, address=self.address,
            ).fit(retained, progress=progress)
            mine = load_states(self.store_, self.manifest_, all_steps=True)
            theirs = load_states(fresh.store_, fresh.manifest_, all_steps=True)
            seen = checkpoint_digests_match(self.store_, self.manifest_, self.config_)
            shards = []
            for s, (a, b) in enumerate(zip(mine, theirs)):
                diffs = [
                    {"step": step, "tensors": states_identical(x, y)}
                    for step, (x, y) in enumerate(zip(a, b))
                ]
                diffs = [d for d in diffs if d["tensors"]]
                same = not diffs and len(a) == len(b) and seen[s]
                shards.append({"shard": s, "identical": same, "steps": len(a), "diffs": diffs,
                               "ids_digests_match": seen[s]})
            test = self.test_data()
            preds_same = None
            if test is not None and len(test) and self.manifest_.shards and not back:
                p1, a1 = self.shard_proba(test.features)
                p2, a2 = fresh.shard_proba(test.features)
                preds_same = bool(np.array_equal(p1, p2) and np.array_equal(a1, a2))
            fresh._executor().shutdown(release=True)  # its scratch store is about to go
        finally:
            if tmp is not None:
                tmp.cleanup()
            if scratch is not None:
                scratch.remove()
        identical = all(s["identical"] for s in shards) and preds_same is not False and not back
        return VerifyReport(identical, shards, preds_same, time.perf_counter() - t0, back,
                            work_store)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()


def check_slices(config: SISAConfig, n_samples: int) -> None:
    """Refuse a sharding that leaves most slices empty: every slice step costs a checkpoint per
    shard, so S*R far above the number of samples writes gigabytes of checkpoints for nothing."""
    s, r = config.sharding.n_shards, config.sharding.n_slices
    limit = max(1, -(-n_samples // s))  # a shard's expected size: more slices are mostly empty
    if r > limit:
        raise ValueError(
            f"{r} slices per shard for {n_samples} samples in {s} shards (about {n_samples / s:.1f} "
            f"per shard) would leave most slices empty. Use at most {limit} slices (--slices) "
            "for this data, or fewer shards."
        )


def check_data(config: SISAConfig, data: SampleSet, what: str) -> None:
    """Refuse data that does not fit the config's pinned model shape, before anything is written."""
    t = config.training
    if tuple(data.input_shape) != tuple(t.input_shape):
        raise ValueError(
            f"Samples of {what} have shape {data.input_shape}, but the model takes "
            f"{tuple(t.input_shape)} (input_shape). Give data of that shape."
        )
    if data.task == "regression":
        if t.n_classes != 1:
            raise ValueError(f"Regression has one output; n_classes must be 1, got {t.n_classes}.")
    elif len(data) and int(data.labels.max()) >= t.n_classes:
        raise ValueError(
            f"{what} has label {int(data.labels.max())}, but n_classes is {t.n_classes}: labels "
            f"must lie in [0, {t.n_classes}). Raise n_classes (--n-classes) or fix the labels."
        )


def checkpoint_digests_match(store: Store, manifest: Manifest, config: SISAConfig) -> list[bool]:
    """Per shard: does every checkpoint record exactly the retained ids of its slices?"""
    from .core.checkpoint import Checkpoint

    out = []
    for e in manifest.shards:
        ids = store.read_table(e.data.path, columns=["id"]).column("id").to_numpy()
        _, slice_of = assign(ids, config.sharding)
        ok = True
        for step, ref in enumerate(e.checkpoints):
            ck = Checkpoint.from_bytes(store.read_bytes(ref.path), where=f"{store.location}/"
                                       f"{ref.path}", expected_sha256=ref.sha256)
            ok &= ck.ids_digest == ids_digest(ids[slice_of <= step])
        out.append(bool(ok))
    return out


def load_states(store: Store, manifest: Manifest, all_steps: bool = False) -> list:
    """Model states per shard from a store's live checkpoints."""
    from .core.checkpoint import Checkpoint

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
