"""The ``f32`` comparison preset on a Ray instance limited to a few CPUs: wall time and table.

    .venv/bin/python benchmarks/compare_f32.py                       # 2 CPUs, digits, random 10%
    .venv/bin/python benchmarks/compare_f32.py --cpus 2 --forget class:3
    .venv/bin/python benchmarks/compare_f32.py --dataset fashion_mnist --max-train 6000

Runs ``sisa-ray compare --preset f32`` (32 seeds of the original, gold and unlearned models,
every method, one Tune experiment) in a fresh local Ray instance with ``--cpus`` CPUs, so the
time measured is what a machine with that many cores takes. Writes the table, the plots and
``f32_summary.json`` (wall time, CPUs, settings) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--dataset", default=None, help="override the preset's dataset")
    ap.add_argument("--forget", default=None, help="override the preset's forget request")
    ap.add_argument("--max-train", type=int, default=None, help="subsample the training split")
    ap.add_argument("--seeds", type=int, default=None, help="override the preset's 32 seeds")
    ap.add_argument("--out", default="benchmarks/results/compare-f32", help="output directory")
    args = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from tune.compare import PRESETS, CompareConfig, run_comparison
    from tune.report import to_markdown

    out = Path(args.out).resolve()
    settings = dict(PRESETS["f32"])
    for key in ("dataset", "forget", "max_train", "seeds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    cfg = CompareConfig(**settings, out=str(out),
                        mlflow_uri=f"sqlite:///{out / 'mlflow.db'}")
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    result = run_comparison(cfg, say=lambda m: print(m, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    ray.shutdown()
    summary = {"wall_seconds": wall, "cpus": args.cpus, "settings": settings,
               "mlflow": result["mlflow"]}
    (out / "f32_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(to_markdown(result["rows"]))
    print(f"wall time {wall:.0f}s on {args.cpus} CPUs; files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
