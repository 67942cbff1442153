"""The SISA cost model against hand-computed values, and the bench on a tiny run."""

from __future__ import annotations

import json
import math

import pytest

from sisa_ray.core.config import TrainingConfig
from sisa_ray.core.cost import (
    expected_shard_cost,
    expected_shards_touched,
    expected_speedup,
    paper_speedup,
)
from sisa_ray.core.plan import epochs_per_step


@pytest.mark.parametrize("s,r", [(8, 4), (1, 1), (16, 8), (4, 2)])
def test_sisa_schedule_reproduces_the_paper_formula(s, r):
    ideal = [2 * 10 / (r + 1)] * r  # e' = 2E/(R+1) at every step
    assert expected_speedup(s, ideal) == pytest.approx(paper_speedup(s, r))
    assert paper_speedup(8, 4) == pytest.approx(8 * 12 / 9)


def test_expected_shard_cost_by_hand():
    # R=2, one epoch per step: step costs 1/2 and 1 pass; a deletion in slice 0 (p=1/2)
    # retrains both (1.5), in slice 1 retrains step 1 only (1.0): mean 1.25
    assert expected_shard_cost([1, 1], 1) == pytest.approx(1.25)
    # two deletions: min slice is 0 with p = 3/4 -> 0.75 * 1.5 + 0.25 * 1.0
    assert expected_shard_cost([1, 1], 2) == pytest.approx(1.375)


def test_batched_expectation_falls_to_one():
    epochs = epochs_per_step(TrainingConfig(epochs=10), 4)
    one = expected_speedup(8, epochs, 1, batched=True)
    assert one == pytest.approx(expected_speedup(8, epochs))
    many = [expected_speedup(8, epochs, k, batched=True) for k in (1, 4, 16, 64, 1024)]
    assert many == sorted(many, reverse=True) and many[-1] == pytest.approx(1.0, abs=1e-3)
    assert expected_shards_touched(8, 1) == 1
    assert expected_shards_touched(8, 2) == pytest.approx(8 * (1 - (7 / 8) ** 2))


@pytest.mark.ray
@pytest.mark.slow
def test_bench_tiny_run(ray_session, tmp_path, capsys):
    from sisa_ray.cli import main

    out = tmp_path / "bench"
    code = main(["bench", "--dataset", "digits", "--model", "mlp", "--shards", "2",
                 "--slices", "2", "--requests", "2", "--repeats", "1", "--epochs", "2",
                 "--max-train", "300", "--threads", "2", "--out", str(out), "--no-mlflow",
                 "--no-cli", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    (row,) = summary["rows"]
    assert row["shards"] == 2 and row["slices"] == 2 and row["threads_per_shard"] == 2
    assert 0 < row["parallel_efficiency"] <= 1.5
    # real torch processes: two threads per shard on the session's 2 CPUs is one worker
    assert row["workers"] == 1 and row["workers_pss_mb"] > row["workers_uss_mb"] > 50
    assert row["seq_delete_sample_steps"] <= row["full_sample_steps"]
    assert row["batch_delete_sample_steps"] <= row["full_sample_steps"]
    assert row["seq_speedup_wall_vs_retrain"] == pytest.approx(
        row["retrain_ensemble_wall_s"] / row["seq_delete_wall_s"])
    assert row["expected_speedup_one"] == pytest.approx(
        expected_speedup(2, epochs_per_step(TrainingConfig(epochs=2), 2)))
    tp = summary["throughput"]
    assert math.isfinite(tp["ratio"])
    # the warm actor's job, phase by phase: the phases are the job's time, no more
    warm = tp["warm_actor"]
    assert set(warm["phases"]) == {"data", "features", "setup", "compute", "checkpoint"}
    assert warm["threads"] == 2  # --threads 2, as the shard's job ran it
    assert all(v >= 0 for v in warm["phases"].values()) and warm["phases"]["compute"] > 0
    assert sum(warm["phases"].values()) <= warm["job_s"] <= warm["call_s"]
    assert warm["compute_per_s"] >= warm["job_per_s"] >= warm["call_per_s"]
    assert tp["ratio"] == pytest.approx(warm["compute_per_s"] / tp["plain_loop_per_s"])
    for f in ("bench.csv", "bench.json", "speedup_vs_shards.png", "speedup_vs_requests.png",
              "accuracy_vs_shards.png"):
        assert (out / f).exists(), f
