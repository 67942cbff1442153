"""What every ``sisa-ray`` command shares: errors, output (text or strict JSON), progress lines and
the options about the store and the Ray cluster."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from ..core.config import ResourceConfig

EXIT_BAD_INPUT = 2


class CLIError(Exception):
    """A user error the CLI reports in one line."""


def _emit(args, payload: dict, text: str) -> None:
    if args.json:
        print(json.dumps(_strict(payload), indent=1, default=_json_default, allow_nan=False))
    else:
        print(text)


def _strict(o):
    """JSON has no NaN or infinity: an undefined number is null."""
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict(v) for v in o]
    if isinstance(o, (float, np.floating)) and not np.isfinite(o):
        return None
    return o


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _progress(args, label: str):
    if args.json or args.quiet:
        return None
    start = time.perf_counter()

    def show(p: dict) -> None:
        el = time.perf_counter() - start
        print(
            f"  [{label}] shard {p['shard']:>3}  {p['done']:>3}/{p['total']}  "
            f"from slice {p.get('start_step', 0)}  {p['sample_steps']:>9} sample-steps  "
            f"{p['seconds']:6.2f}s  (elapsed {el:6.1f}s)",
            file=sys.stderr, flush=True,
        )

    return show


def _status_printer(args):
    """Status lines to stderr, or nothing with --json/--quiet."""
    if args.json or args.quiet:
        return lambda m: None
    return lambda m: print(m, file=sys.stderr, flush=True)


def _ensemble_kwargs(args) -> dict:
    return {
        "backend": args.backend,
        "address": args.address,
        "resources": ResourceConfig(
            num_cpus=args.cpus_per_shard, num_gpus=args.gpus_per_shard,
            max_concurrent=args.max_concurrent,
        ),
    }


def _open(args, recover: bool = True):
    """Open the store. Readers pass ``recover=False``: they never take the writer lock."""
    from ..ensemble import SISAEnsemble

    return SISAEnsemble.open(args.store, recover=recover, progress=_progress(args, "recover"),
                             **_ensemble_kwargs(args))


def _accuracy_table(ens, test) -> dict:
    from ..core.aggregation import aggregate, aggregate_regression

    probs, active = ens.shard_proba(test.features)
    if test.task == "regression":
        def mae(pred):
            return float(np.abs(pred - test.labels).mean())

        return {
            "mae_mean": mae(aggregate_regression(probs, active, "mean")),
            "mae_median": mae(aggregate_regression(probs, active, "median")),
            "shards": [None if not a else mae(p[:, 0]) for p, a in zip(probs, active)],
        }
    hard = aggregate(probs, active, "hard")[0]
    soft = aggregate(probs, active, "soft")[0]
    per_shard = [
        None if not a else float((p.argmax(1) == test.labels).mean())
        for p, a in zip(probs, active)
    ]
    return {
        "ensemble_hard": float((hard == test.labels).mean()),
        "ensemble_soft": float((soft == test.labels).mean()),
        "shards": per_shard,
    }



def _add_common(p: argparse.ArgumentParser, store: bool = True) -> None:
    if store:
        p.add_argument("--store", required=True,
                       help="local path or pyarrow.fs URI (s3://, gs://, file://) of the store")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--backend", choices=["ray", "local"], default="ray",
                   help="ray: shard actors (default); local: in-process, no Ray")
    p.add_argument("--address", default=None,
                   help="Ray cluster address ('auto'); default: RAY_ADDRESS or a local instance")
    p.add_argument("--cpus-per-shard", type=float, default=0.0,
                   help="CPUs each worker reserves (default 0: a token share; the pool has one "
                        "worker per CPU)")
    p.add_argument("--gpus-per-shard", type=float, default=0.0,
                   help="GPUs per worker (the pool then has one worker per GPU share)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="workers, i.e. shards training at once (default: cluster CPUs / threads)")
