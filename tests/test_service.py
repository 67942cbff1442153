"""The deletion service: acknowledged at once, applied in the background, coalesced in batches,
predictions served from the live models throughout, and the result exact."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_exactness import assert_exact, fit

from sisa_ray.core.ledger import Ledger
from sisa_ray.core.plan import assign
from sisa_ray.core.store import LockTimeout
from sisa_ray.ensemble import SISAEnsemble
from sisa_ray.executor import LocalExecutor
from sisa_ray.service import DeletionService


class GatedExecutor(LocalExecutor):
    """Retrains only when the test opens the gate, so requests can arrive mid-retrain."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.started = threading.Event()
        self.batches: list[list[int]] = []

    def run_jobs(self, jobs, progress=None):
        self.started.set()
        assert self.gate.wait(60)
        self.batches.append(sorted(j.shard for j in jobs))
        return super().run_jobs(jobs, progress)


def test_requests_arriving_during_a_retrain_are_coalesced(tiny, tiny_config, tmp_path):
    train, test = tiny
    path = str(tmp_path / "s")
    fit(tiny_config, train, tmp_path, "s", test)
    shard, _ = assign(train.ids, tiny_config.sharding)
    a, b, c = (int(train.ids[shard == s][0]) for s in (0, 1, 2))
    ex = GatedExecutor()
    svc = DeletionService(SISAEnsemble.open(path, executor=ex))
    try:
        before = svc.predict(test.features)["predictions"]
        ack = svc.submit([a], request_id="first")
        assert ack["status"] == "pending"
        assert Ledger(svc.ens.store_).state().requests["first"].status == "pending"  # durable
        assert ex.started.wait(30)  # the first retrain is running
        svc.submit([b], request_id="second")
        svc.submit([c], request_id="third")
        # predictions keep coming from the live models while the shard retrains
        assert svc.predict(test.features)["predictions"] == before
        # another writer is locked out while the service runs
        with pytest.raises(LockTimeout):
            with svc.ens.store_.writer_lock(timeout=0.1):
                pass
        ex.gate.set()
        for rid in ("first", "second", "third"):
            assert svc.wait(rid)["status"] == "completed"
        # the durable record: each completion's report names the requests retrained together
        assert svc.request("first")["report"]["batch"] is None
        for rid in ("second", "third"):
            assert svc.request(rid)["report"]["batch"] == ["second", "third"]
        assert ex.batches == [[0], [1, 2]]
        with pytest.raises(ValueError, match="never trained on"):
            svc.submit([10**12])
        dup = svc.submit([a], request_id="first")
        assert dup["status"] == "completed"
        after = svc.predict(test.features)
        assert after["generation"] == 3
    finally:
        svc.close()
    ens = SISAEnsemble.open(path, backend="local")
    assert_exact(ens, tiny_config, train, test, [a, b, c], tmp_path)
    np.testing.assert_array_equal(ens.predict(test.features), after["predictions"])
