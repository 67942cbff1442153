"""``sisa-ray bench``: what exact unlearning saves, measured side by side in one run.

For every (shards, slices) configuration it measures, on Ray actors:

* ensemble training: wall time, the sum of per-shard training times and the parallel efficiency
  ``sum / (wall * min(S, concurrent))``; actor start-up is reported apart (paid once);
* ``K`` single-id deletion requests one at a time, and ``K`` ids in one batched request: wall
  time, retrained sample-steps, and where the time goes (training, actor-side I/O, driver);
* the naive baselines: retraining the whole ensemble from scratch, and one model on all data;
* test accuracy of the ensemble (majority and soft vote) against the single model;
* next to each measured speedup, the SISA cost model's expectation (:mod:`sisa_ray.core.cost`)
  and the paper's ``S * 3R / (2R + 1)``.

Plus the per-sample throughput of a shard actor against a plain PyTorch loop on the same model
and batch size. Results go to CSV, JSON, plots and an MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .core.config import ResourceConfig, ShardingConfig, SISAConfig, TrainingConfig
from .core.cost import expected_shards_touched, expected_speedup, paper_speedup
from .core.data import SampleSet
from .core.plan import epochs_per_step
from .core.training import deterministic_torch, make_optimizer, seeded
from .models import build_model

log = logging.getLogger(__name__)

PRESETS = {
    # a quick look, a few minutes on 2 cores (S=1 is the single model, measured anyway)
    "fast": dict(shards=[2, 4, 8], slices=[1, 4], requests=4, repeats=1, epochs=5,
                 max_train=5000),
    "full": dict(shards=[1, 2, 4, 8, 16], slices=[1, 2, 4, 8], requests=16, repeats=3,
                 epochs=10, max_train=None),
    # the runtime at many shards: training, deletion and worker memory up to S=256
    "sweep": dict(shards=[8, 32, 128, 256], slices=[4], requests=4, repeats=1, epochs=5,
                  max_train=10000),
}


@dataclass(frozen=True)
class BenchSpec:
    dataset: str
    model: str
    shards: list[int]
    slices: list[int]
    requests: int
    repeats: int
    epochs: int
    batch_size: int
    max_train: int | None
    mode: str
    seed: int
    data_dir: str | None = None
    cli: bool = True
    address: str | None = None
    resources: ResourceConfig | None = None
    threads: int = 1
    micro_batches: int = 1


def plain_loop_throughput(data: SampleSet, model_name: str, batch_size: int, epochs: int,
                          seed: int = 0, threads: int = 1) -> float:
    """Samples per second of a bare PyTorch training loop (same model, optimiser and torch
    threads as a shard)."""
    training = TrainingConfig(model=model_name, batch_size=batch_size)
    model = build_model(model_name, data.input_shape, data.n_classes, seed=seed)
    opt = make_optimizer(model, training)
    x = torch.from_numpy(np.array(data.features))
    y = torch.from_numpy(np.array(data.labels))
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with deterministic_torch(threads), seeded(seed, torch.device("cpu")):
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=gen)
            for s in range(0, len(y), batch_size):
                idx = perm[s:s + batch_size]
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
    return len(y) * epochs / (time.perf_counter() - t0)


def warm_actor_throughput(ens, sample_steps: int) -> dict:
    """Run shard 0's training job again on the worker that just trained it (a warm actor: torch
    loaded, kernels and allocator warmed by the first run). A job is idempotent, so the rerun
    writes the same bytes to the same paths. Returns samples per second of the forward and
    backward passes alone (``compute_per_s``, what a plain loop does), of the whole job in the
    worker (``job_per_s``) and of the driver's call (``call_per_s``), and the seconds of each
    phase of the job (data read and SHA-256 check, setup, compute, checkpoint serialisation and
    writes); ``cold`` holds the first run's phases."""
    from .core.jobs import TrainJob

    entry = ens.manifest_.shards[0]
    job = TrainJob(shard=0, version=entry.version, data=entry.data.to_dict())
    t0 = time.perf_counter()
    res = ens.executor.run_jobs([job])[0]
    call = time.perf_counter() - t0
    if res["entry"]["checkpoints"] != [c.to_dict() for c in entry.checkpoints]:
        raise RuntimeError("The rerun of a training job wrote other checkpoints: the job is "
                           "not deterministic on this worker.")
    phases = res["phases"]
    return {"compute_per_s": sample_steps / phases["compute"],
            "job_per_s": sample_steps / res["seconds"], "call_per_s": sample_steps / call,
            "phases": phases, "job_s": res["seconds"], "call_s": call,
            "threads": res.get("threads", 1),
            "cold": ens.fit_results_[0].get("phases", {})}


@contextlib.contextmanager
def _pool(spec: BenchSpec):
    """One pool of workers for the whole bench: started once, each worker moved to the next
    configuration's store (see RayExecutor.bind), stopped at the end."""
    from .executor import make_executor

    pool = make_executor("ray", spec.resources, spec.address)
    try:
        yield pool
    finally:
        pool.shutdown()


def _fit(config: SISAConfig, train: SampleSet, test: SampleSet, store: str, spec: BenchSpec,
         pool):
    """Fit on the bench's one pool of workers (started once, moved from store to store);
    returns the ensemble, the training wall time without worker start-up, and that start-up."""
    from .ensemble import SISAEnsemble

    ens = SISAEnsemble(config, store=store, backend="ray", address=spec.address,
                       resources=spec.resources, executor=pool)
    started = pool.startup_seconds
    t0 = time.perf_counter()
    ens.fit(train, test)
    startup = pool.startup_seconds - started
    return ens, time.perf_counter() - t0 - startup, startup


def run_config(spec: BenchSpec, train: SampleSet, test: SampleSet, s: int, r: int, repeat: int,
               workdir: Path, cores: int, pool) -> dict:
    training = TrainingConfig(model=spec.model, epochs=spec.epochs, batch_size=spec.batch_size,
                              threads=spec.threads, micro_batches=spec.micro_batches)
    config = SISAConfig(sharding=ShardingConfig(n_shards=s, n_slices=r, seed=repeat),
                        training=training)
    ens, fit_wall, startup = _fit(config, train, test, str(workdir / f"s{s}-r{r}-{repeat}"), spec,
                                  pool)
    shard_sum = sum(x["train_seconds"] for x in ens.fit_results_)
    concurrent = min(s, ens.executor.max_concurrent())
    row = {
        "workers": len(ens.executor._workers),
        **{f"workers_{k}_mb": v for k, v in ens.executor.worker_memory_mb().items()},
        "shards": s, "slices": r, "repeat": repeat, "epochs": spec.epochs,
        "threads_per_shard": spec.threads, "micro_batches": spec.micro_batches,
        "epochs_per_step": list(epochs_per_step(training, r)),
        "actor_startup_s": startup, "train_wall_s": fit_wall,
        "train_shard_sum_s": shard_sum, "parallel_efficiency": shard_sum / (fit_wall * concurrent),
        "acc_hard": ens.score(test, "hard"), "acc_soft": ens.score(test, "soft"),
        "full_sample_steps": int(sum(x["sample_steps"] for x in ens.fit_results_)),
    }
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, s, r, repeat]))
    victims = rng.choice(train.ids, size=2 * spec.requests, replace=False)
    if spec.mode in ("sequential", "both"):
        walls, steps, actor, trained = [], [], [], []
        for v in victims[: spec.requests]:
            rep = ens.unlearn([int(v)])
            walls.append(rep.wall_seconds)
            steps.append(rep.retrained_sample_steps)
            actor.append(sum(x.seconds for x in rep.shards))
            trained.append(sum(x.train_seconds for x in rep.shards))
        row.update({
            "seq_delete_wall_s": float(np.mean(walls)),
            "seq_delete_sample_steps": float(np.mean(steps)),
            "seq_delete_train_s": float(np.mean(trained)),
            "seq_delete_actor_io_s": float(np.mean(actor) - np.mean(trained)),
            "seq_delete_driver_s": float(np.mean(walls) - np.mean(actor)),
        })
        row["seq_speedup_wall"] = fit_wall / row["seq_delete_wall_s"]
        # at equal resources: the core-seconds a full retrain takes over the wall time of a
        # deletion (a one-id deletion retrains one shard on one worker while the full retrain
        # keeps every core busy, so on C cores the wall speedup is bounded near this / C)
        row["seq_speedup_core_seconds"] = shard_sum / row["seq_delete_wall_s"]
        row["seq_speedup_steps"] = row["full_sample_steps"] / max(1.0, row["seq_delete_sample_steps"])
    if spec.mode in ("batched", "both"):
        rep = ens.unlearn(victims[spec.requests:].tolist())
        row.update({
            "batch_delete_wall_s": rep.wall_seconds,
            "batch_delete_sample_steps": rep.retrained_sample_steps,
            "batch_shards_touched": len(rep.shards),
            "batch_speedup_wall": fit_wall / rep.wall_seconds,
            "batch_speedup_steps": row["full_sample_steps"] / max(1, rep.retrained_sample_steps),
        })
    ens.shard_proba(test.features[:256])  # every live model loaded once
    row["predict_256_s"] = _timed(lambda: ens.shard_proba(test.features[:256]))
    row.update({f"workers_{k}_mb_after_predict": v
                for k, v in ens.executor.worker_memory_mb().items()})
    # the command line end to end on the configuration SISA is for: the most shards and slices,
    # where a deletion is cheapest and the fixed cost of a command shows most
    if repeat == 0 and spec.cli and (s, r) == (max(spec.shards), max(spec.slices)):
        row.update(cli_latency(ens, victims[: spec.requests].tolist(), train))
    epochs = epochs_per_step(training, r)
    row["expected_speedup_one"] = expected_speedup(s, epochs)
    row["expected_speedup_batched"] = expected_speedup(s, epochs, spec.requests, batched=True)
    row["expected_shards_touched"] = expected_shards_touched(s, spec.requests)
    row["paper_speedup"] = paper_speedup(s, r)
    # the naive baseline: retrain the whole ensemble from scratch on the remaining data
    remaining = ens.retained_data()
    retrain, retrain_wall, _ = _fit(config, remaining, test,
                                    str(workdir / f"re-s{s}-r{r}-{repeat}"), spec, pool)
    row["retrain_ensemble_wall_s"] = retrain_wall
    if "seq_delete_wall_s" in row:
        # the same speedup against the naive retrain on the warm pool: the first fit also pays
        # each worker's first-job costs, so this is the steadier figure of the two
        row["seq_speedup_wall_vs_retrain"] = retrain_wall / row["seq_delete_wall_s"]
    row["cores"] = cores
    return row


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cli(*args: str, address: str | None = None) -> float:
    """Wall seconds of one ``sisa-ray`` command, as a user runs it (a new process)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cmd = [sys.executable, "-m", "sisa_ray", *args, "--quiet"]
    if address:
        cmd += ["--address", address]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {out.stderr.strip()[-500:]}")
    return wall


def cli_latency(ens, victims: list[int], train: SampleSet) -> dict:
    """What a user sees at the command line, beside the in-process figures: one-id deletions
    and ``status``, cold (a new Ray instance, new workers) and warm (a running cluster whose
    detached workers the previous command left), and the in-process figure on the same store."""
    import subprocess
    import sys

    import ray

    store = ens.store_.uri
    live = set(ens.retained_data().ids.tolist()) - set(victims)
    extra = sorted(live)[:4]
    address = ray.get_runtime_context().gcs_address
    t_import = _timed(lambda: subprocess.run([sys.executable, "-c", "import torch"], check=True))
    out = {
        "cli_import_torch_s": t_import,
        "cli_status_cold_s": _cli("status", "--store", store),
        "cli_delete_local_backend_s": _cli("delete", "--store", store, "--backend", "local",
                                           "--ids", str(extra[0])),
        "cli_delete_cold_s": _cli("delete", "--store", store, "--ids", str(extra[1])),
        "cli_delete_first_on_cluster_s": _cli("delete", "--store", store, "--ids",
                                              str(extra[2]), address=address),
        "cli_delete_warm_s": _cli("delete", "--store", store, "--ids", str(extra[3]),
                                  address=address),
    }
    from .executor import release_workers

    release_workers(store, address)
    ens.refresh()
    t0 = time.perf_counter()
    rep = ens.unlearn([sorted(live)[4]])
    out["inproc_delete_s"] = time.perf_counter() - t0
    out["inproc_delete_train_s"] = sum(x.train_seconds for x in rep.shards)
    return out


def run_bench(spec: BenchSpec, out: Path, mlflow_uri: str | None = None,
              say=print, progress=None) -> dict:
    """Run the benchmark; ``progress(done, total, what)`` is called after each measured stage
    (the single model, the throughput, each configuration)."""
    from .datasets import load_dataset
    from .ensemble import SISAEnsemble
    from .executor import ensure_ray

    started = time.perf_counter()
    # the data first: a missing dataset or too few samples fail before Ray starts
    train, test = load_dataset(spec.dataset, data_dir=spec.data_dir)
    if spec.max_train is not None and spec.max_train < len(train):
        rng = np.random.default_rng(spec.seed)
        train = train.select_ids(rng.choice(train.ids, spec.max_train, replace=False))
    if 2 * spec.requests + 5 > len(train):
        raise ValueError(f"--requests {spec.requests}: the benchmark deletes 2 x {spec.requests} "
                         f"ids (plus 5 for the CLI runs) from {len(train)} training samples. Use "
                         f"--requests {max(1, (len(train) - 5) // 2)} or less.")
    ensure_ray(spec.address)
    import ray

    cores = int(ray.cluster_resources().get("CPU", 1))
    total = 2 + len(spec.shards) * len(spec.slices) * spec.repeats
    tick = progress or (lambda done, total, what: None)
    say(f"[bench] {spec.dataset}: {len(train)} train, {len(test)} test, model {spec.model}, "
        f"{cores} CPU(s)")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sisa-bench-") as tmp, _pool(spec) as pool:
        work = Path(tmp)
        # the single model on all data, with every core (what a user would retrain naively)
        training = TrainingConfig(model=spec.model, epochs=spec.epochs,
                                  batch_size=spec.batch_size, threads=cores)
        single = SISAEnsemble(
            SISAConfig(sharding=ShardingConfig(n_shards=1, n_slices=1), training=training),
            store=str(work / "single"), backend="local",
        )
        t0 = time.perf_counter()
        single.fit(train, test)
        single_wall = time.perf_counter() - t0
        single_acc = single.score(test)
        say(f"[bench] single model: {single_wall:.1f}s on {cores} threads, accuracy "
            f"{single_acc:.4f}")
        tick(1, total, "single model")
        # throughput: one shard actor (S=1, R=1) vs a plain loop, same model and batch size
        n_tp = min(len(train), 5000)
        sub = train.take(np.arange(n_tp))
        # best of three, each: a few seconds of training is at the mercy of the machine
        plain = max(plain_loop_throughput(sub, spec.model, spec.batch_size, 2,
                                          threads=spec.threads) for _ in range(3))
        one = SISAConfig(sharding=ShardingConfig(n_shards=1, n_slices=1),
                         training=TrainingConfig(model=spec.model, epochs=2,
                                                 batch_size=spec.batch_size,
                                                 threads=spec.threads,
                                                 micro_batches=spec.micro_batches))
        ens, _, _ = _fit(one, sub, test, str(work / "throughput"), spec, pool)
        warm = max((warm_actor_throughput(ens, n_tp * 2) for _ in range(3)),
                   key=lambda w: w["compute_per_s"])
        actor_tp = warm["compute_per_s"]
        say(f"[bench] throughput: plain loop {plain:.0f}/s on {spec.threads} thread(s); warm "
            f"shard actor {actor_tp:.0f}/s on {warm['threads']} computing "
            f"({actor_tp / plain:.2f}x), {warm['job_per_s']:.0f}/s for the whole job "
            f"({warm['job_per_s'] / plain:.2f}x), {warm['call_per_s']:.0f}/s with the driver's "
            f"call ({warm['call_per_s'] / plain:.2f}x); per job "
            + ", ".join(f"{k} {v:.2f}s" for k, v in warm["phases"].items()))
        tick(2, total, "throughput")
        for s in spec.shards:
            for r in spec.slices:
                for rep in range(spec.repeats):
                    row = run_config(spec, train, test, s, r, rep, work, cores, pool)
                    row.update({"single_acc": single_acc, "single_wall_s": single_wall})
                    rows.append(row)
                    say(_line(row))
                    tick(2 + len(rows), total, f"S={s} R={r} repeat {rep}")
    summary = {
        "spec": {**spec.__dict__, "resources": None if spec.resources is None
                 else dataclasses.asdict(spec.resources)},
        "cores": cores, "n_train": len(train),
        "single_model": {"wall_s": single_wall, "acc": single_acc},
        "throughput": {"plain_loop_per_s": plain, "actor_per_s": actor_tp,
                       "ratio": actor_tp / plain, "ratio_job": warm["job_per_s"] / plain,
                       "ratio_with_driver": warm["call_per_s"] / plain, "warm_actor": warm},
        "rows": rows,
        # the whole run as the user waits for it: data, Ray, workers, every measurement
        "total_wall_s": time.perf_counter() - started,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    files = _write(summary, out)
    if mlflow_uri is not False:
        _log_mlflow(summary, files, mlflow_uri)
    return summary


def _line(row: dict) -> str:
    parts = [f"S={row['shards']:>2} R={row['slices']}",
             f"train {row['train_wall_s']:6.1f}s (eff {row['parallel_efficiency']:.2f})",
             f"acc hard {row['acc_hard']:.4f} soft {row['acc_soft']:.4f}"]
    if "seq_delete_wall_s" in row:
        parts.append(f"1-id delete {row['seq_delete_wall_s']:.2f}s: wall x{row['seq_speedup_wall']:.1f}"
                     f" (x{row['seq_speedup_wall_vs_retrain']:.1f} vs the retrain)"
                     f", core-seconds x{row['seq_speedup_core_seconds']:.1f}, steps "
                     f"x{row['seq_speedup_steps']:.1f} (expect x{row['expected_speedup_one']:.1f})")
    if "batch_delete_wall_s" in row:
        parts.append(f"batch: wall x{row['batch_speedup_wall']:.1f}, steps "
                     f"x{row['batch_speedup_steps']:.1f} (expect "
                     f"x{row['expected_speedup_batched']:.1f})")
    parts.append(f"{row['workers']} worker(s): {row['workers_pss_mb']:.0f} MB PSS "
                 f"({row['workers_uss_mb']:.0f} MB USS) after training, "
                 f"{row['workers_pss_mb_after_predict']:.0f} MB PSS "
                 f"({row['workers_uss_mb_after_predict']:.0f} USS) after predicting")
    if "cli_delete_warm_s" in row:
        parts.append(
            f"CLI delete cold {row['cli_delete_cold_s']:.1f}s, warm {row['cli_delete_warm_s']:.1f}s"
            f", local backend {row['cli_delete_local_backend_s']:.1f}s, in-process "
            f"{row['inproc_delete_s']:.2f}s; status {row['cli_status_cold_s']:.1f}s (import torch "
            f"{row['cli_import_torch_s']:.1f}s)")
    return "[bench] " + " | ".join(parts)


def _write(summary: dict, out: Path) -> list[Path]:
    rows = summary["rows"]
    (out / "bench.json").write_text(json.dumps(summary, indent=1, default=float))
    keys = sorted({k for r in rows for k in r})
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return [out / "bench.json", out / "bench.csv", *_plots(summary, out)]


def _plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .core.cost import expected_speedup as expect

    rows = summary["rows"]
    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in sorted({x["slices"] for x in rows}):
        sel = sorted((x for x in rows if x["slices"] == r and "seq_speedup_wall" in x),
                     key=lambda x: x["shards"])
        if not sel:
            continue
        xs = [x["shards"] for x in sel]
        line, = ax.plot(xs, [x["seq_speedup_wall"] for x in sel], "o-", label=f"R={r} wall")
        ax.plot(xs, [x["seq_speedup_steps"] for x in sel], "s--", color=line.get_color(),
                alpha=0.6, label=f"R={r} sample-steps")
        ax.plot(xs, [x["expected_speedup_one"] for x in sel], ":", color=line.get_color(),
                label=f"R={r} expected")
    ax.set_xlabel("shards S")
    ax.set_ylabel("speedup of one deletion vs full retrain")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "speedup_vs_shards.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ks = np.unique(np.geomspace(1, 4096, 40).astype(int))
    for x in {(x["shards"], x["slices"]): x for x in rows}.values():
        if x["shards"] == 1:
            continue
        sp = [expect(x["shards"], x["epochs_per_step"], int(k), batched=True) for k in ks]
        line, = ax.plot(ks, sp, label=f"S={x['shards']} R={x['slices']} expected")
        if "batch_speedup_steps" in x:
            ax.plot([summary["spec"]["requests"]], [x["batch_speedup_steps"]], "o",
                    color=line.get_color())
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("ids deleted in one batch (K)")
    ax.set_ylabel("sample-step speedup vs full retrain")
    ax.set_title("Batched deletions: SISA stops paying off where the curve meets 1")
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / "speedup_vs_requests.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in sorted({x["slices"] for x in rows}):
        sel = sorted((x for x in rows if x["slices"] == r), key=lambda x: x["shards"])
        ax.plot([x["shards"] for x in sel], [x["acc_hard"] for x in sel], "o-",
                label=f"R={r} majority")
        ax.plot([x["shards"] for x in sel], [x["acc_soft"] for x in sel], "s--",
                label=f"R={r} soft")
    ax.axhline(summary["single_model"]["acc"], color="k", lw=0.8, label="single model")
    ax.set_xlabel("shards S")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "accuracy_vs_shards.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _log_mlflow(summary: dict, files: list[Path], uri: str | None) -> None:
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    from tune.tracking import _clean, default_tracking_uri, use_experiment

    use_experiment(uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(),
                   "sisa-ray-bench")
    with mlflow.start_run(run_name=f"bench-{summary['spec']['dataset']}"):
        mlflow.log_params({k: str(v) for k, v in summary["spec"].items()})
        mlflow.log_metrics(_clean({
            "single_acc": summary["single_model"]["acc"],
            "throughput_ratio": summary["throughput"]["ratio"],
        }))
        for row in summary["rows"]:
            with mlflow.start_run(run_name=f"S{row['shards']}-R{row['slices']}-{row['repeat']}",
                                  nested=True):
                mlflow.log_metrics(_clean(row))
        for f in files:
            mlflow.log_artifact(str(f))


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    """The benchmark's settings from the ``bench`` command line, every one checked before
    anything runs: a preset's values unless an option overrides them.

    The per-option checks (integers >= 1, comma-separated lists, choices) are the parser's; this
    checks what spans options and raises ``ValueError`` naming the option and the fix.
    """
    from pathlib import Path

    preset = PRESETS[args.preset]

    def given(value, default):
        return default if value is None else value

    if args.no_mlflow and args.mlflow_uri is not None:
        raise ValueError("--mlflow-uri and --no-mlflow contradict each other; give one of them.")
    if args.mlflow_uri and args.mlflow_uri.startswith("sqlite:///"):
        db = Path(args.mlflow_uri[len("sqlite:///"):])
        if not db.parent.is_dir():  # found now, not when the results are logged hours later
            raise ValueError(f"--mlflow-uri {args.mlflow_uri}: the directory {db.parent} does not "
                             "exist. Create it, or give another tracking URI.")
    out = Path(args.out or "bench-results")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the results.")
    max_train = given(args.max_train, preset["max_train"])
    requests = given(args.requests, preset["requests"])
    if max_train is not None and 2 * requests + 5 > max_train:
        raise ValueError(f"--requests {requests}: the benchmark deletes 2 x {requests} ids (plus 5 "
                         f"for the CLI runs) from --max-train {max_train} samples. Use --requests "
                         f"{max(1, (max_train - 5) // 2)} or less, or a larger --max-train.")
    resources = ResourceConfig(num_cpus=args.cpus_per_shard, num_gpus=args.gpus_per_shard,
                               max_concurrent=args.max_concurrent)
    # the training options together, checked before the data loads and Ray starts
    TrainingConfig(model=args.model, batch_size=args.batch_size, threads=args.threads,
                   micro_batches=args.micro_batches)
    return BenchSpec(
        dataset=args.dataset, model=args.model,
        shards=given(args.shards, preset["shards"]), slices=given(args.slices, preset["slices"]),
        requests=requests, repeats=given(args.repeats, preset["repeats"]),
        epochs=given(args.epochs, preset["epochs"]), batch_size=args.batch_size,
        max_train=max_train, mode=args.mode, seed=args.seed, data_dir=args.data_dir,
        cli=not args.no_cli, address=args.address, resources=resources,
        threads=args.threads, micro_batches=args.micro_batches,
    )
