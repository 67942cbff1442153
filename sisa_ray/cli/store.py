"""The store commands: train, delete, recover, release, abandon, predict, status, verify, serve."""

from __future__ import annotations

import json
import os
import re
import sys
import time

import numpy as np

from ..core.config import MODELS, ShardingConfig, SISAConfig, TrainingConfig
from ..core.store import StoreError
from .common import (
    CLIError,
    _accuracy_table,
    _add_common,
    _check_cluster,
    _emit,
    _ensemble_kwargs,
    _open,
    _progress,
    _status_printer,
)
from .pretrain import add_train_options, train_inputs

# -- commands ---------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    from ..datasets import load_dataset, read_parquet
    from ..ensemble import SISAEnsemble
    from ..ingest import ParquetSource

    if args.dataset.startswith("parquet:"):
        # sharded by parallel tasks: the driver never loads the training data
        train = ParquetSource(args.dataset[len("parquet:"):], n_classes=args.n_classes)
        test = None
        if args.test is not None:
            if not args.test.startswith("parquet:"):
                raise CLIError(f"--test must be parquet:PATH. Got {args.test!r}.")
            test = read_parquet(args.test[len("parquet:"):], args.n_classes)
    else:
        train, test = load_dataset(
            args.dataset, data_dir=args.data_dir, download=args.download, test=args.test,
            n_classes=args.n_classes,
        )
    config = SISAConfig(
        sharding=ShardingConfig(n_shards=args.shards, n_slices=args.slices, seed=args.seed),
        training=TrainingConfig(
            model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            epoch_schedule=args.epoch_schedule, threads=args.threads,
            micro_batches=args.micro_batches, n_classes=args.n_classes, device=args.device,
            cpu_capability=args.cpu_capability,
        ),
    )
    train, config = train_inputs(args, train, config)
    if not args.json and not args.quiet:
        size = f"{len(train)} train, " if hasattr(train, "__len__") else ""
        print(
            f"Training {config.sharding.n_shards} shards x {config.sharding.n_slices} slices of "
            f"{args.model} on {getattr(train, 'name', None) or args.dataset} ({size}"
            f"{0 if test is None else len(test)} test samples)",
            file=sys.stderr,
        )
    _check_cluster(args)
    t0 = time.perf_counter()
    ens = SISAEnsemble(config, store=args.store, backbone=args.backbone,
                       **_ensemble_kwargs(args)).fit(
        train, test, progress=_progress(args, "train", announce=True)
    )
    wall = time.perf_counter() - t0
    if isinstance(train, ParquetSource) and args.n_classes is None and not args.quiet \
            and ens.task_ == "classification" and not args.json:
        print(f"note: n_classes={ens.config_.training.n_classes} was taken from the largest "
              "label present; pass --n-classes so that a retrain after deletions builds the "
              "same model", file=sys.stderr)
    status = ens.status()
    # the same train command on a store it already trained opens it (and finishes pending
    # deletions): nothing trained here, so there is no placement to report
    trained = getattr(ens, "fit_results_", None) is not None
    nodes = ens.executor.placement() if trained else []
    for entry, node in zip(status["shards"], nodes):
        entry["node"] = node
    payload = {"store": ens.store_.location, "config_hash": status["config_hash"],
               "wall_seconds": wall, "shards": status["shards"],
               "nodes": len(set(nodes)), "already_trained": not trained}
    lines = [f"Trained in {wall:.1f}s on {len(set(nodes))} node(s). Store: {ens.store_.location}"
             if trained else f"Already trained with this config and data; opened "
             f"{ens.store_.location} in {wall:.1f}s (nothing retrained)"]
    if test is not None:
        acc = _accuracy_table(ens, test)
        regression = test.task == "regression"
        payload["test_mae" if regression else "test_accuracy"] = acc
        lines.append(
            f"Test MAE: mean of shards {acc['mae_mean']:.4f}, median {acc['mae_median']:.4f}"
            if regression else
            f"Test accuracy: majority vote {acc['ensemble_hard']:.4f}, "
            f"soft vote {acc['ensemble_soft']:.4f}"
        )
        for s, a in enumerate(acc["shards"]):
            n = status["shards"][s]["n_samples"]
            what = "MAE" if regression else "accuracy"
            lines.append(f"  shard {s:>3}: {n:>6} samples  "
                         + ("abstains" if a is None else f"{what} {a:.4f}"))
    _emit(args, payload, "\n".join(lines))
    ens.close()
    return 0


def _parse_ids(args) -> list[int]:
    raw: list[str] = []
    if args.ids is not None:
        raw += [t for t in args.ids.replace("\n", ",").split(",") if t.strip()]
    if args.ids_file is not None:
        try:
            with open(args.ids_file) as f:
                raw += [t for line in f for t in line.replace(",", " ").split()]
        except FileNotFoundError as e:
            raise CLIError(f"--ids-file {args.ids_file} does not exist.") from e
    if not raw:
        raise CLIError("The deletion request is empty: give --ids 3,17,42 or --ids-file FILE.")
    toks = [t.strip() for t in raw]
    bad = [t for t in toks if not _INT.fullmatch(t)]
    if bad:
        raise CLIError(
            f"Sample ids must be integers (digits, optional sign); got {bad[:10]}. Give ids as "
            "in your data's 'id' column."
        )
    return [int(t) for t in toks]


_INT = re.compile(r"[+-]?[0-9]+")


def cmd_delete(args) -> int:
    ids = _parse_ids(args)
    _check_cluster(args)
    ens = _open(args)
    report = ens.unlearn(ids, request_id=args.request_id,
                         progress=_progress(args, "retrain", announce=True))
    d = report.to_dict()
    lines = [f"Request {report.request_id}: {len(report.ids)} id(s)"]
    if report.duplicate_request:
        lines.append("  this request id was already completed; nothing was done again")
    if report.already_deleted:
        lines.append(f"  already deleted earlier: {report.already_deleted[:20]}")
    lines.append(f"  deleted now: {report.deleted[:20]}{' ...' if len(report.deleted) > 20 else ''}")
    if report.in_test_split:
        lines.append(f"  removed from the stored test split (no retraining): "
                     f"{report.in_test_split[:20]}")
    for s in report.shards:
        lines.append(
            f"  shard {s.shard:>3}: retrained from slice {s.restart_slice}, "
            f"{s.deleted} deleted, {s.sample_steps} sample-steps, {s.seconds:.2f}s"
        )
    if report.sample_step_speedup is None:
        lines.append(f"  nothing to retrain; wall time {report.wall_seconds:.2f}s")
    else:
        lines.append(
            f"  retrained sample-steps: {report.retrained_sample_steps} "
            f"(full retrain: {report.full_retrain_sample_steps}, "
            f"{report.sample_step_speedup:.1f}x fewer); wall time {report.wall_seconds:.2f}s"
        )
    _emit(args, d, "\n".join(lines))
    ens.close()
    return 0


def cmd_recover(args) -> int:
    ens = _open(args, recover=False)
    reports = ens.recover(progress=_progress(args, "recover"))
    lines = [f"Finished {len(reports)} request(s)"] + [
        f"  {r.request_id}: {len(r.deleted)} id(s) deleted" for r in reports]
    _emit(args, {"requests": [r.to_dict() for r in reports]}, "\n".join(lines))
    ens.close()
    return 0


def cmd_release(args) -> int:
    from ..core.store import Store
    from ..executor import joins_cluster, release_workers

    if not joins_cluster(args.address):
        raise CLIError("release stops the warm workers of a running cluster: give --address auto "
                       "(or set RAY_ADDRESS). Without a cluster, workers end with each command.")
    n = release_workers(Store(args.store).uri, args.address)
    _emit(args, {"released": n}, f"Stopped {n} worker(s) of {args.store}.")
    return 0


def cmd_abandon(args) -> int:
    ens = _open(args, recover=False)
    ens.abandon(args.request_id, args.reason)
    _emit(args, {"abandoned": args.request_id, "reason": args.reason},
          f"Request {args.request_id} abandoned: its ids stay in the models ({args.reason}).")
    return 0


def cmd_predict(args) -> int:
    import pyarrow.parquet as pq

    from ..predictions import predictions_table

    try:
        table = pq.read_table(args.input)
    except FileNotFoundError as e:
        raise CLIError(f"--input {args.input} does not exist.") from e
    missing = [c for c in ("id", "features") if c not in table.column_names]
    if missing:
        raise CLIError(
            f"--input {args.input} lacks column(s) {missing}; it needs 'id' and 'features'."
        )
    x = _feature_rows(table, args.input)
    n = table.num_rows
    ens = _open(args, recover=False)
    if n == 0:
        raise CLIError(f"--input {args.input} has no rows; nothing to predict.")
    probs, active = ens.shard_proba(x)  # the generation it used is ens.manifest_'s from here on
    vote = args.vote
    if ens.task_ == "regression":  # one output per shard: mean (or --vote median) of them
        vote = "median" if args.vote == "median" else "mean"
    label = table.column("label") if "label" in table.column_names else None
    out = predictions_table(
        table.column("id"), probs, active, task=ens.task_, vote=vote, label=label,
        provenance={"store": ens.store_.location, "generation": ens.manifest_.generation,
                    "config_hash": ens.meta_["config_hash"]},
        with_shard_proba=args.shard_proba,
    )
    pq.write_table(out, args.output)
    pred = out.column("prediction").to_numpy()
    payload = {"output": os.path.abspath(args.output), "rows": n, "vote": vote,
               "generation": ens.manifest_.generation,
               "abstaining_shards": np.flatnonzero(~active).tolist()}
    text = f"Wrote {n} predictions ({vote} vote, generation {ens.manifest_.generation}) to " \
           f"{args.output}"
    if label is not None:
        truth = label.to_numpy()
        if ens.task_ == "regression":
            payload["mae"] = float(np.abs(pred - truth).mean())
            text += f"; MAE against 'label': {payload['mae']:.4f}"
        else:
            payload["accuracy"] = float((pred == truth).mean())
            text += f"; accuracy against 'label': {payload['accuracy']:.4f}"
    _emit(args, payload, text)
    ens.close()
    return 0


def _feature_rows(table, where: str) -> np.ndarray:
    """The 'features' column as an (N, width) array, every row checked."""
    import pyarrow as pa

    feats = table.column("features").combine_chunks()
    if not (pa.types.is_list(feats.type) or pa.types.is_large_list(feats.type)
            or pa.types.is_fixed_size_list(feats.type)):
        raise CLIError(f"--input {where}: 'features' must be a list column; found {feats.type}.")
    if feats.null_count:
        rows = np.flatnonzero(feats.is_null().to_numpy(zero_copy_only=False))[:10].tolist()
        raise CLIError(f"--input {where}: 'features' is null in row(s) {rows}; every row needs "
                       "feature values.")
    if len(feats) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if pa.types.is_fixed_size_list(feats.type):
        width = feats.type.list_size
    else:
        lengths = np.diff(feats.offsets.to_numpy())
        width = int(lengths[0])
        if (lengths != width).any():
            odd = np.flatnonzero(lengths != width)[:10].tolist()
            raise CLIError(
                f"--input {where}: ragged 'features': row 0 has {width} values but row(s) {odd} "
                f"have {sorted(set(lengths[odd].tolist()))}. Every row needs the same width."
            )
    x = feats.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return x.reshape(len(feats), width)


def cmd_status(args) -> int:
    ens = _open(args, recover=False)
    st = ens.status()
    t, s = st["config"]["training"], st["config"]["sharding"]
    lines = [
        f"Store {st['store']}  (config {st['config_hash']}, generation {st['generation']})",
        f"  data: {st['dataset']['name']}, {st['dataset']['n_train']} trained, "
        f"{st['n_train_live']} live, {st['deleted_ids']} deleted, {st['dataset']['n_test']} test",
        f"  sharding: {s['n_shards']} shards x {s['n_slices']} slices, seed {s['seed']}",
        f"  training: {t['model']}, {t['epochs']} epochs ({t['epoch_schedule']} schedule), "
        f"batch {t['batch_size']}"
        + (f" in {t['micro_batches']} micro-batches" if t.get("micro_batches", 1) > 1 else "")
        + f", {t['optimizer']} lr {t['lr']}",
        "  shards:",
    ]
    for e in st["shards"]:
        lines.append(
            f"    {e['shard']:>4}: {e['n_samples']:>7} samples  version {e['version']}  "
            f"slices {e['slice_counts']}" + ("  (abstains)" if e["abstains"] else "")
        )
    led = st["ledger"]
    lines.append(
        f"  ledger: {led['requests']} request(s), {led['completed']} completed, "
        f"{led['pending']} pending, {led['abandoned']} abandoned, {led['deleted_ids']} ids"
    )
    if st["pending_requests"]:
        lines.append(f"  pending: {st['pending_requests']} (a writer finishes them; or run "
                     "`sisa-ray recover`)")
    if st["resurrected_ids"]:
        lines.append(f"  DELETED IDS ARE LIVE AGAIN: {st['resurrected_ids'][:20]} (restored "
                     "backup?); run `sisa-ray recover` to delete them again")
    _emit(args, st, "\n".join(lines))
    ens.close()
    return 0


def cmd_verify(args) -> int:
    _check_cluster(args)
    ens = _open(args, recover=False)
    if not args.json and not args.quiet:
        print("Retraining from scratch on the retained data to compare...", file=sys.stderr)
    rep = ens.verify(work_store=args.work_store, progress=_progress(args, "scratch", announce=True))
    lines = []
    for s in rep.shards:
        mark = "identical" if s["identical"] else f"DIFFERENT at steps {[d['step'] for d in s['diffs']]}"
        lines.append(f"  shard {s['shard']:>4}: {s['steps']} checkpoints {mark}")
    if rep.predictions_identical is not None:
        lines.append(f"  test predictions identical: {rep.predictions_identical}")
    if rep.resurrected_ids:
        lines.append(f"  ids the ledger calls deleted are live: {rep.resurrected_ids[:20]}")
    lines.append(
        ("EXACT: every shard is bit-for-bit the model trained without the deleted data"
         if rep.identical else "NOT EXACT: see the differing shards above")
        + f" ({rep.seconds:.1f}s)"
    )
    _emit(args, rep.to_dict(), "\n".join(lines))
    ens.close()
    return 0 if rep.identical else 1


def cmd_serve(args) -> int:
    import signal
    import threading

    import ray

    from .. import serve as http
    from ..core.runtime import RuntimeMismatch
    from ..core.store import Store

    store = Store(args.store).uri
    say = _status_printer(args)
    say(f"Starting Ray Serve for {store} ...")
    t0 = time.perf_counter()
    stop = threading.Event()
    handlers = {}
    try:
        try:
            url = http.start(store, host=args.host, port=args.port, backend=args.backend,
                             address=args.address, resources=_ensemble_kwargs(args)["resources"],
                             verbose=args.verbose)
        except (StoreError, RuntimeMismatch):
            raise
        except RuntimeError as e:  # the replica's own error and traceback are logged above
            raise CLIError(f"The service did not start ({e}); its error is in the log above.") \
                from None
        # after ray.init, which installs a SIGTERM handler of its own (sys.exit)
        handlers = {sig: signal.signal(sig, lambda *_: stop.set())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        up = time.perf_counter() - t0
        # the one line a user needs, whatever --quiet says
        print(f"sisa-ray serve: {url} serves {store} (up in {up:.1f}s); POST /predict, "
              f"POST /delete, GET /requests/<id>, GET /status. Ctrl-C stops it.",
              file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps({"url": url, "store": store, "startup_seconds": up}),
                  file=args.result_stream, flush=True)
        while not stop.wait(0.5):
            pass
        say("Stopping: finishing the current retrain, releasing the store ...")
    finally:
        http.stop()
        ray.shutdown()  # and with it Ray's forwarding of log lines, before stdout is restored
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 0


def add_parsers(sub) -> None:

    p = sub.add_parser("train", help="train a SISA ensemble into a store")
    _add_common(p)
    p.add_argument("--dataset", default="digits",
                   help="digits | diabetes | fashion-mnist | mnist | cifar10 | parquet:PATH "
                        "(default: digits)")
    p.add_argument("--test", default=None, help="parquet:PATH test split for parquet data")
    p.add_argument("--data-dir", default=None, help="where local dataset files are")
    p.add_argument("--download", action="store_true", help="allow torchvision to download")
    p.add_argument("--model", default="mlp", choices=list(MODELS), help="model of every shard")
    p.add_argument("--shards", type=int, default=8, help="shards S (independent models)")
    p.add_argument("--slices", type=int, default=4,
                   help="slices R per shard (a checkpoint after each)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of each shard")
    p.add_argument("--batch-size", type=int, default=32, help="minibatch size")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--epoch-schedule", choices=["sisa", "per_slice"], default="sisa",
                   help="sisa: the paper's schedule (epochs spread over the slices); per_slice: "
                        "every slice step trains --epochs epochs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training shard")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="split each minibatch into this many micro-batches whose gradients are "
                        "summed in order, each on one thread: a deletion that retrains few "
                        "shards then uses the idle cores, with the same bits (models without "
                        "batch norm; recorded)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed: shard and slice placement, initialisation, order")
    p.add_argument("--n-classes", type=int, default=None,
                   help="number of classes (model outputs); default: the dataset's, for Parquet "
                        "the largest label + 1. Recorded in the store")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where every shard trains; recorded and pinned")
    p.add_argument("--cpu-capability", default=None,
                   choices=["default", "avx2", "avx512", "zvector", "vsx", "sve128", "sve256"],
                   help="PyTorch CPU kernels every shard uses (ATEN_CPU_CAPABILITY); default: "
                        "what this machine uses. Recorded and pinned on every worker")
    add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("delete", help="unlearn samples exactly")
    _add_common(p)
    p.add_argument("--ids", default=None, help="comma-separated sample ids")
    p.add_argument("--ids-file", default=None, help="file of sample ids (whitespace/commas)")
    p.add_argument("--request-id", default=None, help="idempotency key of the request")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("recover", help="finish pending deletions; delete again ids that came "
                                        "back from a restored backup")
    _add_common(p)
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("release", help="stop the warm workers a running cluster keeps for a "
                                        "store")
    _add_common(p)
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("abandon", help="give up a pending deletion whose retrain cannot run "
                                        "(its ids stay in the models)")
    _add_common(p)
    p.add_argument("--request-id", required=True, help="the pending request")
    p.add_argument("--reason", required=True, help="why (recorded in the ledger)")
    p.set_defaults(func=cmd_abandon)

    p = sub.add_parser("predict", help="predict with the live ensemble")
    _add_common(p)
    p.add_argument("--input", required=True,
                   help="Parquet with 'id' (int64) and 'features' (a list of floats per row); an "
                        "optional 'label' is carried through and scored")
    p.add_argument("--output", required=True, help="Parquet to write")
    p.add_argument("--vote", choices=["hard", "soft", "mean", "median"], default="hard",
                   help="classification: hard (majority) or soft; regression: mean or median")
    p.add_argument("--shard-proba", action="store_true",
                   help="also write each shard's probabilities (float32; null where a shard "
                        "abstains): a list per shard in every row")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("status", help="show config, shards and ledger")
    _add_common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("verify", help="retrain from scratch and compare bit for bit")
    _add_common(p)
    p.add_argument("--work-store", default=None,
                   help="where to train the scratch copy (default: a temporary directory, or with "
                        "--address a scratch store beside --store, removed afterwards)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("serve", help="answer predictions and take deletions over HTTP "
                                      "(Ray Serve)")
    _add_common(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: "
                        "every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.set_defaults(func=cmd_serve)
