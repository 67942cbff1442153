"""Many shards end to end, as a user runs them: the CLI against a running Ray cluster.

Starts a one-node cluster (`ray start --head`), then times `sisa-ray train`, `predict`,
`delete` (twice: the second finds warm workers), `status` and `verify` on a store of S shards,
and reads the memory of the shard workers (the processes of the `WorkerActor` class) after each
step. Stops the cluster at the end.

    .venv/bin/python benchmarks/many_shards.py --shards 256 --dataset fashion-mnist --max-train 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from ray_cluster import local_cluster


def worker_memory() -> dict:
    procs = [p for p in psutil.process_iter(["cmdline"])
             if any("WorkerActor" in part for part in (p.info["cmdline"] or []))]
    infos = [p.memory_full_info() for p in procs]
    return {"workers": len(procs), "uss_mb": sum(i.uss for i in infos) / 2**20,
            "pss_mb": sum(i.pss for i in infos) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=256)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--max-train", type=int, default=10000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from sisa_ray.datasets import load_dataset, write_parquet

    steps = []
    with local_cluster() as (address, env), tempfile.TemporaryDirectory(prefix="sisa-many-") as tmp:

        def cli(name: str, *argv: str) -> dict:
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "sisa_ray", *argv, "--json",
                                  "--address", address], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if out.returncode not in (0, 1):
                raise SystemExit(f"{name} failed: {out.stderr[-3000:]}")
            mem = worker_memory()
            steps.append({"step": name, "wall_s": wall, **mem})
            print(f"{name:<14} {wall:7.2f}s   workers {mem['workers']}: {mem['pss_mb']:6.0f} MB "
                  f"PSS, {mem['uss_mb']:6.0f} MB USS", flush=True)
            return json.loads(out.stdout)

        train, test = load_dataset(args.dataset)
        if args.max_train and args.max_train < len(train):
            train = train.take(np.arange(args.max_train))
        write_parquet(train, f"{tmp}/train.parquet")
        write_parquet(test.take(np.arange(min(1000, len(test)))), f"{tmp}/test.parquet")
        store = f"{tmp}/store"
        cli("train", "train", "--store", store, "--dataset", f"parquet:{tmp}/train.parquet",
            "--test", f"parquet:{tmp}/test.parquet", "--n-classes", "10", "--model",
            args.model, "--shards", str(args.shards), "--slices", str(args.slices),
            "--epochs", str(args.epochs))
        cli("predict", "predict", "--store", store, "--input", f"{tmp}/test.parquet",
            "--output", f"{tmp}/pred.parquet")
        cli("delete", "delete", "--store", store, "--ids", str(int(train.ids[1])))
        cli("delete (2nd)", "delete", "--store", store, "--ids", str(int(train.ids[2])))
        cli("status", "status", "--store", store)
        rep = cli("verify", "verify", "--store", store, "--work-store", f"{tmp}/verify")
        cli("release", "release", "--store", store)
        summary = {"shards": args.shards, "slices": args.slices, "dataset": args.dataset,
                   "n_train": len(train), "model": args.model, "steps": steps,
                   "verify_identical": rep["identical"]}
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
