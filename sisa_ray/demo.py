"""``make demo``: train, delete, compare with retraining everything, verify exactness.

Runs on the embedded default (a local Ray instance) and scikit-learn's digits, in a couple of
minutes on 2 CPU cores. The store is ``./sisa-store/demo`` (recreated on every run).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .core.aggregation import aggregate
from .core.config import ShardingConfig, SISAConfig, TrainingConfig
from .datasets import load_digits
from .ensemble import SISAEnsemble


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sisa_ray.demo")
    ap.add_argument("--store", default="sisa-store/demo")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--delete", type=int, default=5, help="how many random ids to delete")
    ap.add_argument("--no-compare", action="store_true", help="skip the method comparison")
    args = ap.parse_args(argv)

    store = Path(args.store).resolve()
    if store.exists():
        shutil.rmtree(store)
    train, test = load_digits()
    config = SISAConfig(
        sharding=ShardingConfig(n_shards=args.shards, n_slices=args.slices, seed=0),
        training=TrainingConfig(model="mlp", epochs=args.epochs, batch_size=32, lr=1e-3),
    )
    _say(f"== sisa-ray demo: {len(train)} training / {len(test)} test digits, "
         f"{args.shards} shards x {args.slices} slices, {args.epochs} epochs")

    from .executor import ensure_ray

    t0 = time.perf_counter()
    ensure_ray()
    _say(f"Ray started in {time.perf_counter() - t0:.1f}s")

    def progress(p: dict) -> None:
        _say(f"  shard {p['shard']} trained ({p['done']}/{p['total']}, {p['seconds']:.2f}s)")

    t0 = time.perf_counter()
    ens = SISAEnsemble(config, store=str(store)).fit(train, test, progress=progress)
    fit_s = time.perf_counter() - t0
    probs, active = ens.shard_proba(test.features)
    hard = (aggregate(probs, active, "hard")[0] == test.labels).mean()
    soft = (aggregate(probs, active, "soft")[0] == test.labels).mean()
    _say(f"\n== Trained in {fit_s:.1f}s (actors start-up included)")
    _say(f"Ensemble test accuracy: majority vote {hard:.4f}, soft vote {soft:.4f}")
    sizes = [e.n_samples for e in ens.manifest_.shards]
    for s, p in enumerate(probs):
        _say(f"  shard {s}: {sizes[s]:>4} samples, test accuracy {(p.argmax(1) == test.labels).mean():.4f}")

    single = SISAEnsemble(
        SISAConfig(sharding=ShardingConfig(n_shards=1, n_slices=1), training=config.training),
        backend="local",
    ).fit(train)
    _say(f"One model on all data, same epochs: test accuracy {single.score(test):.4f}")

    rng = np.random.default_rng(7)
    ids = np.sort(rng.choice(train.ids, size=args.delete, replace=False)).tolist()
    _say(f"\n== Deleting {len(ids)} samples: {ids}")
    rep = ens.unlearn(ids)
    for s in rep.shards:
        _say(f"  shard {s.shard}: retrained from slice {s.restart_slice} "
             f"({s.deleted} deleted, {s.sample_steps} sample-steps, {s.seconds:.2f}s)")
    _say(f"Deletion took {rep.wall_seconds:.2f}s and {rep.retrained_sample_steps} sample-steps; "
         f"retraining every shard would cost {rep.full_retrain_sample_steps} "
         f"({rep.sample_step_speedup:.1f}x more)")
    _say(f"Ensemble test accuracy after deletion: {ens.score(test):.4f}")

    _say("\n== Verifying exactness: training from scratch without the deleted samples")
    ver = ens.verify()
    _say(f"Retraining everything from scratch took {ver.seconds:.1f}s "
         f"vs {rep.wall_seconds:.2f}s for the exact deletion")
    same = sum(s["identical"] for s in ver.shards)
    _say(f"{same}/{len(ver.shards)} shards bit-identical at every slice checkpoint; "
         f"test predictions identical: {ver.predictions_identical}")
    _say("EXACT" if ver.identical else "NOT EXACT")
    _say(f"\nStore: {store}")
    _say(f"Try: .venv/bin/sisa-ray status --store {store}")
    ens.close()
    if not args.no_compare:
        _compare()
    return 0 if ver.identical else 1


def _compare() -> None:
    """A small comparison of every approximate method against the exact path, on Ray Tune."""
    from tune.compare import CompareConfig, run_comparison
    from tune.report import to_markdown

    _say("\n== Comparing approximate unlearning methods with exact SISA deletion "
         "(random 10% of digits, Ray Tune, MLflow)")
    cfg = CompareConfig(dataset="digits", forget="random:0.1", target="sisa", epochs=10,
                        num_samples=2, seeds=2, out="sisa-store/compare")
    result = run_comparison(cfg, say=_say)
    cols = ["method", "forget_acc", "retain_acc", "test_acc", "mia", "alignment", "seconds",
            "time_ratio"]
    _say(to_markdown([{k: r[k] for k in cols} | {"kind": r["kind"]} for r in result["rows"]]))
    _say("Open the MLflow UI:  .venv/bin/mlflow ui --backend-store-uri "
         f"{result['mlflow']['uri']} --host 127.0.0.1")


if __name__ == "__main__":
    sys.exit(main())
