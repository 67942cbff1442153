"""Deletion-aware sharding (SISA paper, Section VI) against uniform hashing, under a skewed
distribution of deletion requests: the expected and the measured retraining cost per request.

A fraction ``--hot-fraction`` of the samples is ``--skew`` times as likely to be asked for
deletion as the rest. Each sample's ``deletion_prior`` is its weight over the largest weight (1
for the hot samples), and ``placement="prior"`` puts the samples with prior >= 0.5 into
``--hot-shards`` shards. Both ensembles then serve the same ``--requests`` single-id deletions
and ``--batches`` requests of ``--batch`` ids each, drawn (without replacement) from that
distribution.

Expected cost of a one-id request: the sum over samples of (probability it is the one requested)
x (sample-gradient steps to retrain its shard from its slice), from the plan alone; of a batched
request, the mean over 2000 simulated batches of the shards it touches, each from its earliest
slice. Measured: the sample-steps (and seconds) each deletion actually retrained.

    .venv/bin/python benchmarks/deletion_aware.py                       # digits, mlp, ~20 s
    .venv/bin/python benchmarks/deletion_aware.py --dataset fashion-mnist --max-train 10000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.core.plan import ShardPlan, epochs_per_step, sample_steps, with_placement
from sisa_ray.datasets import load_dataset
from sisa_ray.ensemble import SISAEnsemble


def expected_cost(ids: np.ndarray, q: np.ndarray, config: SISAConfig, batch: int,
                  rng: np.random.Generator, draws: int = 2000) -> tuple[float, float, int]:
    """From the plan alone: (expected sample-steps of a one-id request drawn from ``q``, of a
    request of ``batch`` distinct ids drawn from ``q`` (Monte Carlo over ``draws`` requests),
    full retrain sample-steps)."""
    sharding = config.sharding
    plan = ShardPlan.build(ids, sharding)
    epochs = epochs_per_step(config.training, sharding.n_slices)
    counts = {s: plan.slice_counts(s) for s in range(sharding.n_shards)}
    table = np.array([[sample_steps(counts[s], epochs, k) for k in range(sharding.n_slices)]
                      for s in range(sharding.n_shards)], dtype=float)
    single = float(q @ table[plan.shard, plan.slice_])
    total = 0.0
    for _ in range(draws):
        pick = rng.choice(ids.size, size=batch, replace=False, p=q)
        restart: dict[int, int] = {}
        for s, k in zip(plan.shard[pick].tolist(), plan.slice_[pick].tolist()):
            restart[s] = min(k, restart.get(s, k))
        total += sum(table[s, k] for s, k in restart.items())
    full = sum(sample_steps(counts[s], epochs) for s in range(sharding.n_shards))
    return single, total / draws, int(full)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--hot-shards", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--hot-fraction", type=float, default=0.05)
    ap.add_argument("--skew", type=float, default=40.0, help="weight of a hot sample over a cold")
    ap.add_argument("--requests", type=int, default=8, help="one-id requests, one at a time")
    ap.add_argument("--batch", type=int, default=8, help="ids of each batched request")
    ap.add_argument("--batches", type=int, default=4, help="batched requests, measured mean")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    train, test = load_dataset(args.dataset, data_dir=args.data_dir)
    if args.max_train:
        train = train.take(np.arange(min(args.max_train, len(train))))
    rng = np.random.default_rng(args.seed)
    hot = rng.random(len(train)) < args.hot_fraction
    weight = np.where(hot, args.skew, 1.0)
    q = weight / weight.sum()
    prior = weight / weight.max()
    drawn = rng.choice(train.ids, size=args.requests + args.batch * args.batches, replace=False,
                       p=q).tolist()
    requests = drawn[:args.requests]
    batches = [drawn[args.requests + b * args.batch:args.requests + (b + 1) * args.batch]
               for b in range(args.batches)]

    training = TrainingConfig(model=args.model, epochs=args.epochs, batch_size=64)
    uniform = ShardingConfig(n_shards=args.shards, n_slices=args.slices, seed=args.seed)
    aware = ShardingConfig(n_shards=args.shards, n_slices=args.slices, seed=args.seed,
                           placement="prior", hot_shards=args.hot_shards, hot_prior=0.5)
    aware = with_placement(aware, train.ids, prior)
    result = {"dataset": train.name, "n_train": len(train), "shards": args.shards,
              "slices": args.slices, "hot_shards": args.hot_shards, "epochs": args.epochs,
              "hot_fraction": args.hot_fraction, "skew": args.skew,
              "share_of_requests_on_hot": float(q[hot].sum()), "requests": args.requests,
              "batch": args.batch, "batches": args.batches,
              "placements": {}}
    tmp = tempfile.mkdtemp(prefix="sisa-aware-")
    for name, sharding in (("uniform", uniform), ("deletion_aware", aware)):
        config = SISAConfig(sharding=sharding, training=training)
        expected, expected_batch, full = expected_cost(
            train.ids, q, config, args.batch, np.random.default_rng(args.seed + 1))
        ens = SISAEnsemble(config, store=f"{tmp}/{name}", backend="local").fit(train, test)
        acc = ens.score(test)
        steps, walls, shards = [], [], []
        for victim in requests:
            rep = ens.unlearn([int(victim)])
            steps.append(rep.retrained_sample_steps)
            walls.append(rep.wall_seconds)
            shards.append([s.shard for s in rep.shards])
        batch_reps = [ens.unlearn([int(v) for v in batch]) for batch in batches]
        batch_steps = float(np.mean([b.retrained_sample_steps for b in batch_reps]))
        batch_wall = float(np.mean([b.wall_seconds for b in batch_reps]))
        result["placements"][name] = {
            "shard_sizes": [e.n_samples for e in ens.manifest_.shards],
            "expected_sample_steps_per_request": expected,
            "measured_sample_steps_per_request": float(np.mean(steps)),
            "measured_wall_s_per_request": float(np.mean(walls)),
            "expected_sample_steps_batch": expected_batch,
            "measured_sample_steps_batch": batch_steps,
            "measured_wall_s_batch": batch_wall,
            "batch_retrained_shards": [[s.shard for s in b.shards] for b in batch_reps],
            "full_retrain_sample_steps": full,
            "expected_speedup_vs_full": full / expected,
            "measured_speedup_vs_full": full / float(np.mean(steps)),
            "test_accuracy_hard": acc,
            "retrained_shards": shards,
        }
        ens.close()
        r = result["placements"][name]
        print(f"{name:>15}: expected {expected:9.0f} sample-steps/request, measured "
              f"{r['measured_sample_steps_per_request']:9.0f} ({r['measured_wall_s_per_request']:.2f}"
              f" s); batch of {args.batch}: expected {expected_batch:9.0f}, measured "
              f"{batch_steps:9.0f} ({batch_wall:.2f} s, "
              f"{np.mean([len(b.shards) for b in batch_reps]):.1f} shards); full retrain "
              f"{full}; accuracy {acc:.3f}; "
              f"shard sizes {r['shard_sizes']}", flush=True)
    u, a = result["placements"]["uniform"], result["placements"]["deletion_aware"]
    result["expected_cost_ratio"] = u["expected_sample_steps_per_request"] / \
        a["expected_sample_steps_per_request"]
    result["measured_cost_ratio"] = u["measured_sample_steps_per_request"] / \
        a["measured_sample_steps_per_request"]
    result["measured_wall_ratio"] = u["measured_wall_s_per_request"] / \
        a["measured_wall_s_per_request"]
    result["expected_batch_cost_ratio"] = u["expected_sample_steps_batch"] / \
        a["expected_sample_steps_batch"]
    result["measured_batch_cost_ratio"] = u["measured_sample_steps_batch"] / \
        a["measured_sample_steps_batch"]
    result["measured_batch_wall_ratio"] = u["measured_wall_s_batch"] / a["measured_wall_s_batch"]
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"uniform / deletion-aware cost: expected {result['expected_cost_ratio']:.2f}x, "
          f"measured {result['measured_cost_ratio']:.2f}x sample-steps, "
          f"{result['measured_wall_ratio']:.2f}x wall; batch of {args.batch}: expected "
          f"{result['expected_batch_cost_ratio']:.2f}x, measured "
          f"{result['measured_batch_cost_ratio']:.2f}x sample-steps, "
          f"{result['measured_batch_wall_ratio']:.2f}x wall")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
