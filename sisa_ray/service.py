"""A long-running deletion service: acknowledge at once, retrain in the background, in batches.

The service holds the store's writer lock for its whole life (it is the store's one writer), so
acknowledging a request never waits for a retrain: :meth:`DeletionService.submit` validates the
ids against the live data, appends the request to the ledger durably and returns its id. A
background thread applies pending requests; every request that arrives while a retrain runs is
pending when it ends, and the next round retrains all of them at once (the batching of the SISA
paper, Section V-B: one retrain of each affected shard from the earliest affected slice).
Predictions come from the live manifest throughout: a shard's new checkpoints serve only once the
manifest that names them is live.

This module is plain Python (the HTTP edge is :mod:`sisa_ray.serve`), so tests drive it directly.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from .core.ledger import Ledger
from .core.manifest import read_manifest
from .deletion import DeletionContext, default_request_id, recover, validate_ids
from .ensemble import SISAEnsemble
from .transfer import refuse_public_request

log = logging.getLogger(__name__)


class DeletionService:
    """Serve predictions and take deletions for one store.

    Parameters
    ----------
    ensemble : an opened :class:`SISAEnsemble` (its executor does the retraining).
    lock_timeout : how long to wait for the store's writer lock at start.
    """

    def __init__(self, ensemble: SISAEnsemble, lock_timeout: float = 30.0) -> None:
        self.ens = ensemble
        self._lock_cm = ensemble.store_.writer_lock(timeout=lock_timeout)
        self.lock = self._lock_cm.__enter__()
        self._ack_mutex = threading.Lock()  # acknowledgements, one at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.last_error: str | None = None
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sisa-ray-deletions", daemon=True)
        self._thread.start()
        self._wake.set()  # finish anything pending from before

    # -- requests ----------------------------------------------------------------------------------

    def submit(self, ids, request_id: str | None = None) -> dict:
        """Durably acknowledge a deletion request; it is applied in the background."""
        ids = validate_ids(ids)
        refuse_public_request(self.ens.store_, self.ens.config_, ids)
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise ValueError(f"request_id must be a non-empty string. Got {request_id!r}.")
        rid = request_id or default_request_id(ids)
        with self._ack_mutex:
            ledger = Ledger(self.ens.store_)
            state = ledger.state()
            if rid in state.requests:
                if sorted(ledger.request_ids(rid)) != ids.tolist():
                    raise ValueError(f"Request id {rid!r} was already used for other ids. Use a "
                                     "new request id for a new request.")
                return self.request(rid)
            ctx = DeletionContext(self.ens.store_, self.ens.config_, None, None)
            live = ctx.held(read_manifest(self.ens.store_), ids)
            pending = {i for r in state.pending() for i in (r.ids or [])}
            known = state.deleted | pending
            unknown = [i for i, ok in zip(ids.tolist(), live) if not ok and i not in known]
            if unknown:
                raise ValueError(
                    f"{len(unknown)} id(s) were never trained on in this store: {unknown[:20]}. "
                    "Nothing was recorded. Send the request again without them."
                )
            ledger.acknowledge(rid, ids.tolist(), self.lock)
        self._wake.set()
        return {"request_id": rid, "status": "pending", "ids": ids.tolist()}

    def request(self, request_id: str) -> dict:
        """Status of a request: pending, completed (with its report) or abandoned."""
        ledger = Ledger(self.ens.store_)
        req = ledger.state().requests.get(request_id)
        if req is None:
            raise KeyError(f"Unknown request id {request_id!r}.")
        out = {"request_id": request_id, "status": req.status}
        if req.status == "completed":
            out["report"] = ledger.report(request_id)
        elif req.status == "pending" and self.last_error:
            out["last_error"] = self.last_error
        return out

    def wait(self, request_id: str, timeout: float = 300.0) -> dict:
        """Block until a request is no longer pending (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.request(request_id)
            if st["status"] != "pending" or time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    # -- predictions -------------------------------------------------------------------------------

    def predict(self, features, vote: str | None = None) -> dict:
        x = np.asarray(features, dtype=np.float32) if not isinstance(features, np.ndarray) \
            else features
        probs, active = self.ens.shard_proba(x)
        if self.ens.task_ == "regression":
            from .core.aggregation import aggregate_regression

            pred = aggregate_regression(probs, active, vote if vote in ("mean", "median")
                                        else "mean")
            return {"predictions": pred.tolist(), "generation": self.ens.manifest_.generation}
        from .core.aggregation import aggregate

        pred, agg = aggregate(probs, active, vote or self.ens.vote)
        return {"predictions": pred.tolist(), "proba": agg.tolist(),
                "generation": self.ens.manifest_.generation}

    def status(self) -> dict:
        self.ens.refresh()  # the background thread may have made a newer generation live
        st = self.ens.status()
        st["retraining"] = self._busy.is_set()
        st["last_error"] = self.last_error
        return st

    # -- the background loop -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            if self._stop.is_set():
                return
            self._wake.clear()
            pending = Ledger(self.ens.store_).pending()
            if not pending:
                continue
            self._busy.set()
            try:
                recover(self.ens._context(), self.lock)
                self.last_error = None
            except Exception as e:  # kept for the status endpoint; retried on the next wake-up
                log.exception("applying deletions failed")
                self.last_error = f"{type(e).__name__}: {e}"
                self._stop.wait(2.0)
                self._wake.set()
            finally:
                self._busy.clear()

    def close(self) -> None:
        """Stop taking work, finish nothing new, release the writer lock."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=600)
        self._lock_cm.__exit__(None, None, None)
