"""Peak memory of the driver when training from Parquet, at 1x and 4x the data.

Starts a one-node Ray cluster (`ray start --head`), writes Fashion-MNIST training rows as Parquet
(several row groups), and for each size runs a fresh driver process that joins the cluster and
trains with ``SISAEnsemble.fit(ParquetSource(...))``; the driver reports its own peak RSS
(``getrusage``). The shard files are written by Ray tasks, so the driver should not grow with the
data.

    .venv/bin/python benchmarks/driver_memory.py --base 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from ray_cluster import local_cluster

DRIVER = """
import json, resource, sys, time
from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.ensemble import SISAEnsemble
from sisa_ray.ingest import ParquetSource
cfg = SISAConfig(sharding=ShardingConfig(n_shards=8, n_slices=2),
                 training=TrainingConfig(model="mlp", epochs=1, hidden=32, batch_size=128))
t0 = time.perf_counter()
ens = SISAEnsemble(cfg, store=sys.argv[2], address=sys.argv[3]).fit(
    ParquetSource(sys.argv[1], n_classes=10))
print(json.dumps({"rows": ens.meta_["dataset"]["n_train"], "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""



def write_parquet(path: Path, n: int, row_group: int) -> None:
    from sisa_ray.datasets import load_fashion_mnist

    train, _ = load_fashion_mnist(None, False)
    reps = -(-n // len(train))
    tables = []
    for r in range(reps):  # repeat the data with new ids when asked for more than 60k
        take = min(len(train), n - r * len(train))
        flat = train.features[:take].reshape(take, -1)
        tables.append(pa.table({
            "id": pa.array(train.ids[:take] + r * 10_000_000, pa.int64()),
            "label": pa.array(train.labels[:take], pa.int64()),
            "features": pa.array(list(flat), type=pa.list_(pa.float32())),
        }))
    pq.write_table(pa.concat_tables(tables), str(path), row_group_size=row_group)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=int, default=10000)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--row-group", type=int, default=2500)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = {}
    with local_cluster() as (address, env), \
            tempfile.TemporaryDirectory(prefix="sisa-drivermem-") as tmp:
        for mult in (1, args.factor):
            n = args.base * mult
            data = Path(tmp) / f"train-{n}.parquet"
            write_parquet(data, n, args.row_group)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", DRIVER, str(data), f"{tmp}/store-{n}",
                                  address], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["wall_s"] = time.perf_counter() - t0
            results[n] = res
            print(f"{n} rows: driver peak RSS {res['peak_rss_mb']:.0f} MB, "
                  f"fit {res['seconds']:.1f}s", flush=True)
    small, big = results[args.base], results[args.base * args.factor]
    summary = {"rows": list(results), "results": results,
               "peak_growth": big["peak_rss_mb"] / small["peak_rss_mb"]}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
