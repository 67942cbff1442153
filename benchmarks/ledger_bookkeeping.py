"""Per-request bookkeeping over many sequential single-id deletions.

The bookkeeping part of a request is its wall time minus the time its shard spent training:
validation, the ledger (acknowledge, complete, checkpoint), the manifest swap and garbage
collection. With the ledger's compact checkpoint it must not grow with the number of requests
already served. The figure reported is the mean of the first 100 requests against the last 100.

    .venv/bin/python benchmarks/ledger_bookkeeping.py --requests 1000
    .venv/bin/python benchmarks/ledger_bookkeeping.py --requests 1000 --store s3://...  # any URI
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.datasets import load_digits
from sisa_ray.ensemble import SISAEnsemble


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--store", default=None, help="store URI (default: a temporary directory)")
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args()

    train, _ = load_digits()
    if args.requests > len(train):
        raise SystemExit(f"--requests must be <= {len(train)} (one id each)")
    config = SISAConfig(
        sharding=ShardingConfig(n_shards=args.shards, n_slices=args.slices, seed=0),
        training=TrainingConfig(model="mlp", epochs=1, hidden=16, batch_size=64),
    )
    store = args.store or f"{tempfile.mkdtemp(prefix='sisa-ledger-')}/store"
    ens = SISAEnsemble(config, store=store, backend="local").fit(train)
    rng = np.random.default_rng(0)
    victims = rng.permutation(train.ids)[: args.requests]
    rows = []
    for i, victim in enumerate(victims.tolist()):
        t0 = time.perf_counter()
        rep = ens.unlearn([victim], request_id=f"r{i}")
        wall = time.perf_counter() - t0
        train_s = sum(s.train_seconds for s in rep.shards)
        rows.append({"request": i, "wall_s": wall, "train_s": train_s,
                     "bookkeeping_s": wall - train_s})
    w = args.window
    first = float(np.mean([r["bookkeeping_s"] for r in rows[:w]]))
    last = float(np.mean([r["bookkeeping_s"] for r in rows[-w:]]))
    result = {
        "store": store, "requests": args.requests, "shards": args.shards, "slices": args.slices,
        f"bookkeeping_first_{w}_ms": 1000 * first, f"bookkeeping_last_{w}_ms": 1000 * last,
        "growth": last / first,
        "wall_first_ms": 1000 * float(np.mean([r["wall_s"] for r in rows[:w]])),
        "wall_last_ms": 1000 * float(np.mean([r["wall_s"] for r in rows[-w:]])),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**result, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
