"""Transfer from public data against SISA from scratch (the accuracy target of issue 13).

Fashion-MNIST: a backbone (a conv net's convolutional body and hidden layer, ``wide_cnn`` by
default) pretrained on ``--public`` held-out training samples, which are never sharded; then on
the other samples

* the SISA ensemble of mlp heads on the frozen backbone's features (S shards, R slices),
* one mlp head on the same features and the same samples (S=1, R=1),
* the SISA ensembles trained from scratch (each of ``--scratch-models``, S shards, R slices),

all scored on the test set; plus a single-id deletion on each ensemble. Targets: the transfer
ensemble within 1 point of the one model on the same features, and at least 5 points above the
from-scratch ensemble (of each model).

    .venv/bin/python benchmarks/transfer.py --public 1000 --max-train 3000 --backend local  # quick
    .venv/bin/python benchmarks/transfer.py --out benchmarks/results/transfer_fashion-mnist.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.datasets import load_dataset
from sisa_ray.ensemble import SISAEnsemble
from sisa_ray.transfer import pretrain, public_split


def run(name: str, config: SISAConfig, train, test, store: str, backend: str,
        backbone: bytes | None, victim: int) -> dict:
    t0 = time.perf_counter()
    ens = SISAEnsemble(config, store=store, backend=backend, backbone=backbone).fit(train, test)
    fit_wall = time.perf_counter() - t0
    hard, soft = ens.score(test, "hard"), ens.score(test, "soft")
    rep = ens.unlearn([victim])
    out = {"fit_wall_s": fit_wall, "accuracy_hard": hard, "accuracy_soft": soft,
           "delete_wall_s": rep.wall_seconds, "delete_sample_steps": rep.retrained_sample_steps,
           "config_hash": ens.meta_["config_hash"]}
    ens.close()
    print(f"{name:>26}: accuracy hard {hard:.4f} soft {soft:.4f}; fit {fit_wall:.1f}s; "
          f"one-id deletion {rep.wall_seconds:.2f}s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--public", type=int, default=10000, help="held-out public samples")
    ap.add_argument("--max-train", type=int, default=None,
                    help="use at most N of the non-public samples (a quick check)")
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--backbone-model", default="wide_cnn", help="architecture of the backbone")
    ap.add_argument("--backbone-hidden", type=int, default=256,
                    help="hidden width of the backbone (the features' width)")
    ap.add_argument("--pretrain-epochs", type=int, default=40)
    ap.add_argument("--augment", default="shift-flip", help="pretraining augmentation")
    ap.add_argument("--head-epochs", type=int, default=10)
    ap.add_argument("--scratch-epochs", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=128, help="hidden width of each head")
    ap.add_argument("--scratch-models", default="cnn,wide_cnn",
                    help="models of the from-scratch ensembles, comma-separated")
    ap.add_argument("--backend", choices=["ray", "local"], default="ray")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    full, test = load_dataset(args.dataset, data_dir=args.data_dir)
    public, rest = public_split(full, args.public, seed=args.seed)
    if args.max_train:
        rest = rest.take(np.arange(min(args.max_train, len(rest))))
    if args.max_test:
        test = test.take(np.arange(min(args.max_test, len(test))))
    if args.backend == "ray":
        from sisa_ray.executor import ensure_ray

        ensure_ray()
    t0 = time.perf_counter()
    backbone = pretrain(public, TrainingConfig(model=args.backbone_model,
                                               epochs=args.pretrain_epochs, batch_size=64,
                                               hidden=args.backbone_hidden,
                                               threads=os.cpu_count() or 1),
                        seed=args.seed, augment=args.augment)
    pretrain_wall = time.perf_counter() - t0
    print(f"backbone: {args.backbone_model} on {len(public)} public samples in "
          f"{pretrain_wall:.1f}s", flush=True)
    victim = int(rest.ids[len(rest) // 2])
    head = TrainingConfig(model="mlp", epochs=args.head_epochs, batch_size=64,
                          hidden=args.hidden)
    sharded = ShardingConfig(n_shards=args.shards, n_slices=args.slices, seed=args.seed)
    single = ShardingConfig(n_shards=1, n_slices=1, seed=args.seed)
    tmp = tempfile.mkdtemp(prefix="sisa-transfer-")
    result = {"dataset": args.dataset, "n_public": len(public), "n_train": len(rest),
              "n_test": len(test), "shards": args.shards, "slices": args.slices,
              "backbone_model": args.backbone_model, "backbone_hidden": args.backbone_hidden,
              "head_hidden": args.hidden, "pretrain_epochs": args.pretrain_epochs,
              "augment": args.augment,
              "head_epochs": args.head_epochs, "scratch_models": args.scratch_models,
              "scratch_epochs": args.scratch_epochs, "backend": args.backend,
              "pretrain_wall_s": pretrain_wall}
    result["transfer_ensemble"] = run(
        f"transfer S={args.shards}", SISAConfig(sharding=sharded, training=head), rest, test,
        f"{tmp}/transfer", args.backend, backbone, victim)
    result["one_model_same_features"] = run(
        "one head, same features", SISAConfig(sharding=single, training=head), rest, test,
        f"{tmp}/one", args.backend, backbone, victim)
    scratch = {}
    for model in args.scratch_models.split(","):
        training = TrainingConfig(model=model, epochs=args.scratch_epochs, batch_size=64)
        scratch[model] = result[f"scratch_ensemble_{model}"] = run(
            f"{model} from scratch S={args.shards}", SISAConfig(sharding=sharded,
                                                                training=training),
            rest, test, f"{tmp}/scratch-{model}", args.backend, None, victim)
    t, o = (result[k]["accuracy_hard"] for k in ("transfer_ensemble", "one_model_same_features"))
    result["gap_to_one_model_points"] = 100 * (o - t)
    result["gain_over_scratch_points"] = {m: 100 * (t - r["accuracy_hard"])
                                          for m, r in scratch.items()}
    result["targets_met"] = {"within_1_point_of_one_model": o - t <= 0.01, **{
        f"5_points_above_scratch_{m}": t - r["accuracy_hard"] >= 0.05
        for m, r in scratch.items()}}
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"transfer ensemble vs one model on the same features: {100 * (t - o):+.2f} points; "
          "vs the from-scratch ensembles: " + ", ".join(
              f"{m} {g:+.2f} points" for m, g in result["gain_over_scratch_points"].items()),
          flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
