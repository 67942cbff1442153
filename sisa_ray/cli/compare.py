"""``sisa-ray compare``: approximate unlearning methods on Ray Tune against the exact path."""

from __future__ import annotations

from ..core.config import MODELS
from .common import _add_common, _emit, _status_printer


def cmd_compare(args) -> int:
    from tune.compare import CompareConfig, run_comparison
    from tune.report import to_markdown

    cfg = CompareConfig(
        dataset=args.dataset, data_dir=args.data_dir, download=args.download,
        forget=args.forget, methods=tuple(args.methods.split(",")), target=args.target,
        model=args.model, epochs=args.epochs, shards=args.shards, slices=args.slices,
        num_samples=args.num_samples, search=args.search, seeds=args.seeds,
        max_train=args.max_train, mlflow_uri=args.mlflow_uri, experiment=args.experiment,
        address=args.address, out=args.out, seed=args.seed,
    )
    say = _status_printer(args)
    result = run_comparison(cfg, say=say)
    rows = [{k: v for k, v in r.items()} for r in result["rows"]]
    _emit(args, {**result, "rows": rows}, to_markdown(rows))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("compare", help="approximate methods vs exact unlearning, on Ray Tune")
    _add_common(p, store=False)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--forget", default="random:0.1",
                   help="random:FRACTION | class:LABEL | subclass:LABEL:FRACTION | ids:FILE")
    p.add_argument("--methods", default="all", help="'all' or a comma-separated list")
    p.add_argument("--target", choices=["monolith", "sisa"], default="monolith")
    p.add_argument("--model", default="mlp", choices=list(MODELS))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--slices", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=4, help="Tune trials per method")
    p.add_argument("--search", choices=["random", "grid", "optuna"], default="random")
    p.add_argument("--seeds", type=int, default=3, help="seeds for the best config of each method")
    p.add_argument("--max-train", type=int, default=None, help="subsample the training split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mlflow-uri", default=None,
                   help="tracking URI (default: sqlite:///$PWD/mlflow.db)")
    p.add_argument("--experiment", default="sisa-ray-compare")
    p.add_argument("--out", default=None, help="directory for the table and plots")
    p.set_defaults(func=cmd_compare)
