"""``sisa-ray compare``: approximate unlearning methods on Ray Tune against the exact path.

Every method runs as trials of one Tune experiment, so there is no in-process backend: the
command offers no ``--backend``. Resources are per trial (``--cpus-per-trial``,
``--gpus-per-trial``); ``--max-concurrent`` bounds the trials and the per-seed tasks running at
once. A preset (``--preset f32``) fills in every option the command line leaves out.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from ..core.config import MODELS
from .common import Progress, _add_common, _emit, _status_printer, positive_int, progress_mode

# the options a preset may set, and their type on the command line
_OPTIONS = {
    "dataset": str, "data_dir": str, "forget": str, "methods": str, "target": str, "model": str,
    "epochs": positive_int, "batch_size": positive_int, "lr": float, "hidden": positive_int,
    "shards": positive_int, "slices": positive_int, "num_samples": positive_int, "search": str,
    "scheduler": str, "seeds": positive_int, "max_train": positive_int, "seed": int,
    "mlflow_uri": str, "experiment": str, "out": str, "cpus_per_trial": float,
    "gpus_per_trial": float, "max_concurrent": positive_int, "extra_fraction": float,
}


def config_from_args(args) -> object:
    """The :class:`~tune.compare.CompareConfig`: the dataclass defaults, then the preset, then
    every option given on the command line."""
    from tune.config import PRESETS, CompareConfig

    values = dict(PRESETS[args.preset]) if args.preset else {}
    for name in _OPTIONS:
        given = getattr(args, name)
        if given is not None:
            values[name] = given
    if isinstance(values.get("methods"), str):
        values["methods"] = tuple(m.strip() for m in values["methods"].split(",") if m.strip())
    if args.download:
        values["download"] = True
    if values.get("out") is None:
        values["out"] = tempfile.mkdtemp(prefix="sisa-compare-")
    values["out"] = str(Path(values["out"]).resolve())
    return CompareConfig(address=args.address, **values)


def _bar(label: str, total: int):
    """A tqdm bar counting one stage of the comparison (counts, rate, ETA)."""
    bar = Progress(f"[compare] {label}", "bar", unit="item")

    def tell(n: int) -> None:
        bar.update(n, total)
        if n >= total:
            bar.close()

    return tell


def cmd_compare(args) -> int:
    from tune.compare import run_comparison
    from tune.report import to_markdown

    cfg = config_from_args(args)
    verbose = bool(getattr(args, "verbose", False))
    say = _status_printer(args)
    # a terminal gets a bar per stage (seeds, trials, reruns); a log, a line at every tenth
    counter = _bar if progress_mode(args) == "bar" else None
    result = run_comparison(cfg, say=say, verbose=verbose, counter=counter)
    _emit(args, {**result, "config": dataclasses.asdict(cfg)}, to_markdown(result["rows"]))
    return 0


def add_parsers(sub) -> None:
    from tune.config import PRESETS, CompareConfig  # light: no torch, no Ray

    d = {f.name: f.default for f in dataclasses.fields(CompareConfig)}

    p = sub.add_parser(
        "compare", help="approximate methods vs exact unlearning, one parallel Ray Tune experiment",
        description="Every approximate method as trials of one Ray Tune experiment, against the "
                    "exact SISA deletion and the naive retrain; results to MLflow as trials end.")
    _add_common(p, store=False, backend=False, resources=False)

    def opt(flag: str, help: str, **kw) -> None:
        name = flag[2:].replace("-", "_")
        default = d.get(name)
        shown = ",".join(default) if isinstance(default, tuple) else default
        told = f" (default: {shown}, or the preset's)" if default is not None else ""
        p.add_argument(flag, type=_OPTIONS[name], default=None, help=help + told, **kw)

    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="f32: 32 seeds of every model on digits, every method, sized for two "
                        "CPU cores; options given here override it")
    opt("--dataset", "digits, diabetes, fashion_mnist, mnist, cifar10, ... ")
    opt("--data-dir", "where the dataset's files are")
    p.add_argument("--download", action="store_true", default=None,
                   help="let torchvision download a dataset that is not on disk")
    opt("--forget", "random:FRACTION | class:LABEL | subclass:LABEL:FRACTION | ids:FILE")
    opt("--methods", "'all' or a comma-separated list of methods")
    opt("--target", "monolith: one model; sisa: a SISA ensemble, unlearned shard by shard",
        choices=["monolith", "sisa"])
    opt("--model", "model architecture", choices=list(MODELS))
    opt("--epochs", "training epochs of the original and gold models")
    opt("--batch-size", "training batch size")
    opt("--lr", "training learning rate")
    opt("--hidden", "hidden width of the MLP")
    opt("--shards", "SISA shards")
    opt("--slices", "SISA slices per shard")
    opt("--num-samples", "Tune trials per method (random and Optuna search)")
    opt("--search", "how Tune samples each method's space", choices=["random", "grid", "optuna"])
    opt("--scheduler", "asha: stop a method's hopeless trials early (per epoch); fifo: never",
        choices=["asha", "fifo"])
    opt("--seeds", "seeds: original, gold and unlearned models per seed, as parallel Ray tasks; "
                   "the forgetting quality needs 2 or more")
    opt("--max-train", "subsample the training split to this many samples")
    opt("--extra-fraction", "share of the training split held out as extra data, trained on by "
                            "no model: Twin MU's twin forget set, layer_reset's validation split")
    opt("--seed", "seed of the data split and of the search")
    opt("--mlflow-uri", "MLflow tracking URI; else MLFLOW_TRACKING_URI, else "
                        "sqlite:///$PWD/mlflow.db")
    opt("--experiment", "MLflow experiment name")
    opt("--out", "directory for the table, plots and Tune's files (else a new temporary one)")
    opt("--cpus-per-trial", "CPUs each Tune trial and each per-seed rerun reserves")
    opt("--gpus-per-trial", "GPUs (or a share) each Tune trial and rerun reserves; above 0 they "
                            "unlearn on CUDA")
    opt("--max-concurrent", "trials (and per-seed tasks) running at once; else as many as the "
                            "cluster's resources allow")
    p.set_defaults(func=cmd_compare)
