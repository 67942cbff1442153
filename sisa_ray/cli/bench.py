"""``sisa-ray bench``: the speedup of exact unlearning over retraining, and its accuracy cost."""

from __future__ import annotations

from ..core.config import MODELS
from .common import Progress, _add_common, _emit, comma_ints, positive_int, progress_mode


def cmd_bench(args) -> int:
    from pathlib import Path

    from ..bench import run_bench, spec_from_args

    spec = spec_from_args(args)  # every option checked before anything runs
    bar = Progress("bench", progress_mode(args), unit="stage")
    bar.announce("loading the data and starting Ray")
    out = Path(args.out or "bench-results").resolve()
    summary = run_bench(spec, out, mlflow_uri=False if args.no_mlflow else args.mlflow_uri,
                        say=bar.write, progress=bar.update)
    bar.close()
    lines = [f"Results in {out} (bench.csv, bench.json, plots)",
             "| S | R | workers | worker MB (PSS/USS, after predict) | train s | eff | acc hard "
             "| acc soft | 1-id delete s | speedup wall (vs retrain) | speedup steps | expected "
             "| paper |",
             "|" + "---|" * 13]
    for r in summary["rows"]:
        lines.append(
            f"| {r['shards']} | {r['slices']} | {r['workers']} | {r['workers_pss_mb']:.0f}/"
            f"{r['workers_uss_mb']:.0f} ({r['workers_pss_mb_after_predict']:.0f}/"
            f"{r['workers_uss_mb_after_predict']:.0f}) | {r['train_wall_s']:.1f} | "
            f"{r['parallel_efficiency']:.2f} | {r['acc_hard']:.4f} | {r['acc_soft']:.4f} | "
            f"{r.get('seq_delete_wall_s', float('nan')):.2f} | "
            f"{r.get('seq_speedup_wall', float('nan')):.1f} "
            f"({r.get('seq_speedup_wall_vs_retrain', float('nan')):.1f}) | "
            f"{r.get('seq_speedup_steps', float('nan')):.1f} | "
            f"{r['expected_speedup_one']:.1f} | {r['paper_speedup']:.1f} |")
    for r in summary["rows"]:
        if "cli_delete_warm_s" in r:
            lines.append(
                f"end to end, one-id delete (S={r['shards']}): in-process {r['inproc_delete_s']:.2f}s"
                f" | CLI warm (running cluster) {r['cli_delete_warm_s']:.2f}s | CLI first on the "
                f"cluster {r['cli_delete_first_on_cluster_s']:.2f}s | CLI cold (own Ray) "
                f"{r['cli_delete_cold_s']:.2f}s | CLI --backend local "
                f"{r['cli_delete_local_backend_s']:.2f}s; status {r['cli_status_cold_s']:.2f}s "
                f"(python -c 'import torch': {r['cli_import_torch_s']:.2f}s)")
    tp = summary["throughput"]
    lines.append(f"single model: accuracy {summary['single_model']['acc']:.4f}, "
                 f"{summary['single_model']['wall_s']:.1f}s; warm shard actor throughput "
                 f"{tp['ratio']:.2f}x a plain PyTorch loop computing, {tp['ratio_job']:.2f}x "
                 f"for the whole job, {tp['ratio_with_driver']:.2f}x with the driver's call")
    lines.append(f"whole run: {summary['total_wall_s']:.0f}s")
    _emit(args, summary, "\n".join(lines))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "bench", help="speedup of exact unlearning over retraining, accuracy cost",
        description="Measures training, deletions and retraining on Ray shard workers (there "
                    "is no --backend: the workers are what it measures). Its defaults are the "
                    "paper's Fashion-MNIST setting (cnn, batch 64), unlike train's quick digits "
                    "defaults (mlp, batch 32).")
    _add_common(p, store=False, backend=False)
    p.add_argument("--preset", choices=["fast", "full", "sweep"], default="fast",
                   help="fast: S=2,4,8, R=1,4 on 5,000 samples, 4 requests (a few minutes on 2 "
                        "cores); full: the paper's grid; sweep: S up to 256 (runtime, memory). "
                        "Options below override the preset's values")
    p.add_argument("--dataset", default="fashion-mnist",
                   choices=["fashion-mnist", "digits", "mnist", "cifar10"],
                   help="a dataset with a test split")
    p.add_argument("--data-dir", default=None, help="where local dataset files are")
    p.add_argument("--model", choices=list(MODELS), default="cnn", help="model of every shard")
    p.add_argument("--shards", type=comma_ints, default=None,
                   help="shard counts S, comma-separated, e.g. 1,2,4,8 (default: the preset's)")
    p.add_argument("--slices", type=comma_ints, default=None,
                   help="slice counts R, comma-separated, e.g. 1,4 (default: the preset's)")
    p.add_argument("--requests", type=positive_int, default=None,
                   help="deletion requests K (default: the preset's)")
    p.add_argument("--mode", choices=["sequential", "batched", "both"], default="both",
                   help="K one-id requests one after another, one batch of K ids, or both")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="repeats of each configuration (default: the preset's)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="training epochs (default: the preset's)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="minibatch size")
    p.add_argument("--max-train", type=positive_int, default=None,
                   help="subsample the training split to this many (default: the preset's)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads per shard: the pool runs CPUs / threads workers, so more "
                        "threads make a fit less parallel and a one-shard deletion faster")
    p.add_argument("--micro-batches", type=positive_int, default=1,
                   help="micro-batches per minibatch (see train --micro-batches): a one-shard "
                        "deletion computes them on the idle workers' cores")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsample and the victims")
    p.add_argument("--out", default=None, help="results directory (default: ./bench-results)")
    p.add_argument("--mlflow-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                        "sqlite:///$PWD/mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--no-cli", action="store_true",
                   help="skip the end-to-end CLI latency runs (cold and warm)")
    p.set_defaults(func=cmd_bench)
