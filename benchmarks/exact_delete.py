"""One single-id deletion against retraining the whole ensemble, and ensemble vs single-model
accuracy (the measurements the exact path reports).

    .venv/bin/python benchmarks/exact_delete.py --dataset digits --model mlp
    .venv/bin/python benchmarks/exact_delete.py --dataset fashion-mnist --model cnn
    python benchmarks/exact_delete.py --dataset fashion-mnist --model cnn --device cuda \
        --gpus-per-shard 0.125        # on a GPU node: 8 workers share one GPU

Wall times exclude Ray start-up and actor start-up (reported separately): they are paid once per
cluster, not per request.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from sisa_ray.core.checkpoint import states_identical
from sisa_ray.core.config import ResourceConfig, ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.datasets import load_dataset
from sisa_ray.ensemble import SISAEnsemble
from sisa_ray.executor import ensure_ray


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--requests", type=int, default=3, help="single-id deletions to average")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="where the dataset's files are")
    ap.add_argument("--max-train", type=int, default=None, help="use the first N training samples")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--cpus-per-shard", type=float, default=0.0)
    ap.add_argument("--gpus-per-shard", type=float, default=0.0)
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args()

    train, test = load_dataset(args.dataset, data_dir=args.data_dir)
    if args.max_train:
        train = train.take(np.arange(min(args.max_train, len(train))))
    training = TrainingConfig(model=args.model, epochs=args.epochs, batch_size=64, lr=1e-3,
                              device=args.device)
    resources = ResourceConfig(num_cpus=args.cpus_per_shard, num_gpus=args.gpus_per_shard)
    config = SISAConfig(
        sharding=ShardingConfig(n_shards=args.shards, n_slices=args.slices, seed=args.seed),
        training=training,
    )
    ensure_ray()
    tmp = tempfile.mkdtemp(prefix="sisa-bench-")
    ens = SISAEnsemble(config, store=f"{tmp}/ensemble", resources=resources)
    t0 = time.perf_counter()
    ens.fit(train, test)
    fit_wall = time.perf_counter() - t0
    startup = ens.executor.startup_seconds
    acc_hard, acc_soft = ens.score(test, "hard"), ens.score(test, "soft")

    rng = np.random.default_rng(args.seed)
    deletes = []
    deleted: list[int] = []
    for victim in rng.choice(train.ids, size=args.requests, replace=False).tolist():
        rep = ens.unlearn([victim])
        deleted.append(victim)
        deletes.append({"id": victim, "wall_s": rep.wall_seconds,
                        "sample_steps": rep.retrained_sample_steps,
                        "full_sample_steps": rep.full_retrain_sample_steps,
                        "restart": [(s.shard, s.restart_slice) for s in rep.shards]})
        print(f"delete id {victim}: {rep.wall_seconds:.2f}s, {rep.retrained_sample_steps} "
              f"sample-steps, shards/restart {deletes[-1]['restart']}", flush=True)

    # naive: retrain the whole ensemble on the remaining data (actors warm: started, then timed)
    retrain = SISAEnsemble(config, store=f"{tmp}/retrain", resources=resources)
    t0 = time.perf_counter()
    retrain.fit(train.without_ids(np.array(deleted)), test)
    retrain_wall = time.perf_counter() - t0 - retrain.executor.startup_seconds
    same = all(
        not states_identical(a, b) for a, b in zip(ens.shard_states(), retrain.shard_states())
    )
    retrain.close()

    single = SISAEnsemble(
        SISAConfig(sharding=ShardingConfig(n_shards=1, n_slices=1, seed=args.seed),
                   training=training), store=f"{tmp}/single", resources=resources,
    )
    t0 = time.perf_counter()
    single.fit(train, test)
    single_wall = time.perf_counter() - t0 - single.executor.startup_seconds
    acc_single = single.score(test)
    single.close()

    s, r = args.shards, args.slices
    mean_delete = float(np.mean([d["wall_s"] for d in deletes]))
    result = {
        "dataset": args.dataset, "model": args.model, "device": args.device,
        "gpus_per_shard": args.gpus_per_shard, "shards": s, "slices": r,
        "epochs": args.epochs, "n_train": len(train), "n_test": len(test),
        "actor_startup_s": startup, "fit_wall_s": fit_wall - startup,
        "delete_wall_s_mean": mean_delete,
        "retrain_ensemble_wall_s": retrain_wall,
        "wall_speedup": retrain_wall / mean_delete,
        "sample_step_speedup": float(np.mean(
            [d["full_sample_steps"] / d["sample_steps"] for d in deletes])),
        "paper_expected_speedup": s * 3 * r / (2 * r + 1),
        "exact_after_deletes": same,
        "acc_ensemble_hard": acc_hard, "acc_ensemble_soft": acc_soft,
        "acc_single_model": acc_single, "single_model_wall_s": single_wall,
        "deletes": deletes,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    ens.close()


if __name__ == "__main__":
    main()
