"""``sisa-ray bench``: the speedup of exact unlearning over retraining, and its accuracy cost."""

from __future__ import annotations

from ..core.config import MODELS
from .common import _add_common, _emit, _status_printer


def cmd_bench(args) -> int:
    from pathlib import Path

    from ..bench import run_bench, spec_from_args

    spec = spec_from_args(args)
    say = _status_printer(args)
    out = Path(args.out or "bench-results").resolve()
    summary = run_bench(spec, out, mlflow_uri=False if args.no_mlflow else args.mlflow_uri,
                        say=say)
    lines = [f"Results in {out} (bench.csv, bench.json, plots)",
             "| S | R | workers | worker MB (PSS/USS, after predict) | train s | eff | acc hard "
             "| acc soft | 1-id delete s | speedup wall | speedup steps | expected | paper |",
             "|" + "---|" * 13]
    for r in summary["rows"]:
        lines.append(
            f"| {r['shards']} | {r['slices']} | {r['workers']} | {r['workers_pss_mb']:.0f}/"
            f"{r['workers_uss_mb']:.0f} ({r['workers_pss_mb_after_predict']:.0f}/"
            f"{r['workers_uss_mb_after_predict']:.0f}) | {r['train_wall_s']:.1f} | "
            f"{r['parallel_efficiency']:.2f} | {r['acc_hard']:.4f} | {r['acc_soft']:.4f} | "
            f"{r.get('seq_delete_wall_s', float('nan')):.2f} | "
            f"{r.get('seq_speedup_wall', float('nan')):.1f} | "
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
                 f"{summary['single_model']['wall_s']:.1f}s; shard actor throughput "
                 f"{tp['ratio']:.2f}x a plain PyTorch loop")
    _emit(args, summary, "\n".join(lines))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="speedup of exact unlearning over retraining, accuracy cost")
    _add_common(p, store=False)
    p.add_argument("--preset", choices=["fast", "full", "sweep"], default="fast",
                   help="fast: S<=8; full: the paper's grid; sweep: S up to 256 (runtime, memory)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", choices=list(MODELS), default="cnn")
    p.add_argument("--shards", default=None, help="comma-separated, e.g. 1,2,4,8,16")
    p.add_argument("--slices", default=None, help="comma-separated, e.g. 1,2,4,8")
    p.add_argument("--requests", type=int, default=None, help="deletion requests K")
    p.add_argument("--mode", choices=["sequential", "batched", "both"], default="both")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-train", type=int, default=None, help="subsample the training split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results directory (default ./bench-results)")
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--no-cli", action="store_true",
                   help="skip the end-to-end CLI latency runs (cold and warm)")
    p.set_defaults(func=cmd_bench)
