"""Where shards train and predict: in this process (``LocalExecutor``) or on a pool of Ray actors
(``RayExecutor``).

This module and the CLI are the only parts of ``sisa_ray`` that import Ray. Both executors speak
the same small interface, so the ensemble, the tests and failure injection do not care which runs:

* ``bind(store_uri, n_shards, threads, env)`` says which store; it starts nothing;
* ``run_jobs(jobs, progress)`` trains, at most one job per worker at a time;
* ``predict_proba(features, entries)`` asks each live shard model (named by its manifest entry);
* ``placement()``, ``shutdown()``.

A Ray worker hosts many shards (see :class:`~sisa_ray.shard.ShardWorker`). The pool has one worker
per CPU of the cluster divided by the threads per shard (or per GPU, for GPU shards), started
lazily: a deletion that retrains one shard starts one worker. Shards are served by worker
``shard % n_workers``, so each worker's model cache holds a stable subset. On a running cluster
(``address="auto"`` or ``RAY_ADDRESS``) the workers are detached named actors in a namespace of
the store: the next command finds them warm, and :func:`release_workers` stops them; a worker
whose store is gone, or that sat idle for ``idle_timeout_s``, stops itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .core.config import ResourceConfig
from .core.jobs import TrainJob
from .core.runtime import check_capability, usable_cores

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]
WORKER_CPU_TOKEN = 0.001


class LocalExecutor:
    """Runs shards one after another in this process. No Ray needed."""

    name = "local"

    def __init__(self, worker_cls: type | None = None) -> None:
        from .shard import ShardWorker

        self.worker_cls = worker_cls or ShardWorker
        self._worker: Any = None
        self._store_uri: str | None = None
        self.startup_seconds = 0.0

    def bind(self, store_uri: str, n_shards: int, threads: int = 1,
             env: dict[str, str] | None = None, config_hash: str | None = None) -> None:
        # In-process workers cannot change this process's environment: refuse now, before a
        # deletion is acknowledged, if it does not honour the store's pinned runtime.
        check_capability((env or {}).get("ATEN_CPU_CAPABILITY"))
        if store_uri != self._store_uri:
            self._worker, self._store_uri = None, store_uri
        self._n_shards = n_shards

    def _get(self):
        if self._worker is None:
            self._worker = self.worker_cls(self._store_uri)
        return self._worker

    def run_jobs(self, jobs: Sequence[TrainJob], progress: Progress | None = None) -> list[dict]:
        results = []
        for job in jobs:
            # one job at a time in this process: it may use every core
            res = self._get().train(dataclasses.replace(job, parallel=usable_cores()))
            results.append(res)
            if progress:
                progress({"shard": job.shard, "done": len(results), "total": len(jobs), **res})
        return results

    def placement(self) -> list[str]:
        return ["local"] * self._n_shards

    def run_tasks(self, fn: Callable, calls: Sequence[dict]) -> list:
        """``fn(**kwargs)`` for each of ``calls``, in order (data preparation, no model)."""
        return [fn(**kw) for kw in calls]

    def predict_proba(self, features: np.ndarray, entries: list[dict]) -> list[np.ndarray | None]:
        return self._get().predict_proba(entries, features)

    def shutdown(self, release: bool = False) -> None:
        self._worker = None


RAY_CONNECT_TIMEOUT_S = 5.0


class ClusterUnreachable(ConnectionError):
    """The Ray cluster named by ``--address`` (or ``RAY_ADDRESS``) does not answer."""


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               verbose: bool | None = None) -> None:
    """Start or join Ray: ``address=None`` starts a local instance for this process (never a
    cluster that happens to run on this machine), ``"auto"``, ``host:port`` or ``RAY_ADDRESS``
    joins a running cluster, after checking within
    :data:`RAY_CONNECT_TIMEOUT_S` that it answers (Ray itself retries for a minute, logging
    warnings all along).

    ``verbose`` (default: whether this module logs at INFO) forwards the workers' output and
    Ray's start-up messages to this process; otherwise they stay in Ray's log files.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if verbose is None:
        verbose = log.isEnabledFor(logging.INFO)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose,
                              "logging_level": logging.INFO if verbose else logging.ERROR}
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        check_reachable(target)
        kwargs["address"] = target
    else:
        # "local": a plain ray.init() would silently join a cluster started with `ray start`
        kwargs["address"] = "local"
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


def check_reachable(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`ClusterUnreachable` unless a TCP connection to the cluster at ``address``
    (``host:port``, ``ray://host:port`` or ``auto``) opens within ``timeout_s``."""
    if address == "local":
        return
    if address.startswith("ray://"):
        hostport: str | None = address[len("ray://"):]
    else:
        from ray._private.services import canonicalize_bootstrap_address

        try:
            hostport = canonicalize_bootstrap_address(address)
        except Exception as e:  # Ray's own parse or lookup error, whatever its type
            raise ClusterUnreachable(f"--address {address}: {e}") from None
        if hostport is None:
            raise ClusterUnreachable(
                f"--address {address}: no running Ray cluster was found on this machine. Start "
                "one with `ray start --head`, or give the head's address as host:6379.")
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ClusterUnreachable(
            f"The Ray cluster at {address} ({hostport}) does not answer ({reason}) within "
            f"{timeout_s:g}s. Check --address (or RAY_ADDRESS) and that the cluster runs "
            "(`ray status`).") from None


def store_namespace(store_uri: str) -> str:
    """The Ray namespace of a store's detached workers."""
    return "sisa-ray-" + hashlib.sha256(store_uri.encode()).hexdigest()[:12]


def joins_cluster(address: str | None) -> bool:
    return bool(address or os.environ.get("RAY_ADDRESS"))


class WorkerActor:
    """The actor class of the pool: a shell that builds the :class:`~sisa_ray.shard.ShardWorker`
    inside the worker process, so the driver that starts it never imports torch (seconds)."""

    def __init__(self, *args) -> None:
        from .shard import ShardWorker

        self._args = args
        self._worker = ShardWorker(*args)

    def rebind(self, store_uri: str) -> str:
        """Serve another store from this process (torch stays loaded: the seconds a worker
        takes to start are paid once per pool, not once per store)."""
        from .shard import ShardWorker

        self._worker = ShardWorker(store_uri, *self._args[1:])
        return self._worker.ping()

    def ping(self) -> str:
        return self._worker.ping()

    def train(self, job):
        return self._worker.train(job)

    def predict_proba(self, entries, features):
        return self._worker.predict_proba(entries, features)

    def cached_models(self) -> int:
        return self._worker.cached_models()


def _stop_this_actor() -> None:
    """Called inside a detached worker that decided to stop (store gone, or idle)."""
    import ray

    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


class RayExecutor:
    """A pool of Ray actors, each hosting many shards; training bounded to the cluster."""

    name = "ray"

    def __init__(
        self,
        resources: ResourceConfig | None = None,
        *,
        address: str | None = None,
        worker_cls: type | None = None,
        max_restarts: int = 3,
        idle_timeout_s: float = 3600.0,
        startup_timeout_s: float = 600.0,
    ) -> None:
        self.resources = resources or ResourceConfig()
        self.address = address
        self.worker_cls = worker_cls
        self.max_restarts = max_restarts
        self.idle_timeout_s = idle_timeout_s
        # long enough for an autoscaler to add a node; a worker that cannot start fails sooner
        self.startup_timeout_s = startup_timeout_s
        self._workers: dict[int, Any] = {}
        self._store_uri: str | None = None
        self._threads = 1
        self._env: dict[str, str] = {}
        self._config_hash: str | None = None
        self._start_lock = threading.RLock()
        self.startup_seconds = 0.0

    def bind(self, store_uri: str, n_shards: int, threads: int = 1,
             env: dict[str, str] | None = None, config_hash: str | None = None) -> None:
        ensure_ray(self.address)
        self._config_hash = config_hash
        same_runtime = (threads, dict(env or {})) == (self._threads, self._env)
        if store_uri != self._store_uri and same_runtime and self._rebinds():
            self._rebind(store_uri)
        elif (store_uri, threads, dict(env or {})) != (self._store_uri, self._threads, self._env):
            self.shutdown()
        self._store_uri, self._threads, self._env = store_uri, threads, dict(env or {})
        self._n_shards = n_shards

    def _rebinds(self) -> bool:
        """Workers of this driver's own pool move to another store of the same runtime (thread
        count, CPU capability) instead of being replaced. Detached workers on a cluster belong
        to their store's namespace, so they are not moved."""
        return bool(self._workers) and not self.detached and hasattr(
            self.worker_cls or WorkerActor, "rebind")

    def _rebind(self, store_uri: str) -> None:
        import ray

        try:
            ray.get([w.rebind.remote(store_uri) for w in self._workers.values()],
                    timeout=self.startup_timeout_s)
        except Exception:  # noqa: BLE001 - fresh workers report the cause (see _start)
            self.shutdown()

    @property
    def detached(self) -> bool:
        return joins_cluster(self.address)

    def n_workers(self) -> int:
        """Workers of the pool: the shards that may train at once."""
        import ray

        if self.resources.max_concurrent is not None:
            return self.resources.max_concurrent
        total = ray.cluster_resources()
        if self.resources.num_gpus > 0:
            return max(1, int(total.get("GPU", 0) / self.resources.num_gpus))
        return max(1, int(total.get("CPU", 1)) // self._threads)

    max_concurrent = n_workers

    def _start(self, indices: Sequence[int]) -> None:
        """Start (or, on a cluster, find) the workers ``indices``; wait until they answer."""
        with self._start_lock:  # a prediction and a retrain may both need workers
            self._start_locked(indices)

    def _start_locked(self, indices: Sequence[int]) -> None:
        import ray

        new = [i for i in indices if i not in self._workers]
        if not new:
            return
        self._check_feasible()
        options: dict[str, Any] = dict(
            # A token share of a CPU unless asked for more: it keeps idle workers from holding
            # cores other work needs, and makes SPREAD see them, so they go one per node with
            # CPUs (never onto a head node started with 0 CPUs for drivers).
            num_cpus=self.resources.num_cpus or WORKER_CPU_TOKEN,
            num_gpus=self.resources.num_gpus,
            max_restarts=self.max_restarts,
            max_task_retries=self.max_restarts,
            # two threads: predictions are served while the worker trains a shard
            max_concurrency=2,
            # the store's pinned runtime (CPU capability), set before torch loads in the actor
            runtime_env={"env_vars": self._env},
            scheduling_strategy="SPREAD",
        )
        idle = None
        if self.detached:
            ns = store_namespace(self._store_uri)
            cfg = hashlib.sha256(repr(sorted(self._env.items())).encode()).hexdigest()[:8]
            idle = self.idle_timeout_s
            options.update(lifetime="detached", namespace=ns, get_if_exists=True)
        cls = ray.remote(self.worker_cls or WorkerActor)
        t0 = time.perf_counter()
        for i in new:
            opts = dict(options)
            if self.detached:
                opts["name"] = f"worker-{i}-t{self._threads}-{cfg}"
            self._workers[i] = cls.options(**opts).remote(
                self._store_uri, 512.0, idle, _stop_this_actor if idle else None)
        # An actor that refuses the store's runtime fails here, before anything is recorded.
        try:
            hashes = ray.get([self._workers[i].ping.remote() for i in new],
                             timeout=self.startup_timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            for i in new:
                actor = self._workers.pop(i, None)
                if actor is not None and isinstance(e, ray.exceptions.GetTimeoutError):
                    ray.kill(actor, no_restart=True)
            if isinstance(e, ray.exceptions.GetTimeoutError):
                raise WorkerStartTimeout(
                    f"{len(new)} shard worker(s) did not start within {self.startup_timeout_s:g}s "
                    f"(each asks for {options['num_cpus']:g} CPU, {options['num_gpus']:g} GPU; "
                    f"the cluster has {_resources_text(ray.cluster_resources())}). Lower "
                    "--cpus-per-shard/--gpus-per-shard, add nodes, or wait for the autoscaler "
                    "and try again.") from None
            raise _start_error(e) from None
        stale = [i for i, h in zip(new, hashes) if self._config_hash and h != self._config_hash]
        for i in stale:  # a warm worker of an earlier store at this location: replace it
            ray.kill(self._workers.pop(i), no_restart=True)
        if stale:
            time.sleep(0.5)  # let the names free up
            self._start_locked(stale)
        self.startup_seconds += time.perf_counter() - t0
        log.info("%d worker(s) ready in %.1fs", len(new), time.perf_counter() - t0)

    def _check_feasible(self) -> None:
        """Refuse at once what no node of a local Ray instance can give a worker (a cluster's
        autoscaler may still add such a node: there the start-up timeout decides)."""
        import ray

        if self.detached:
            return
        most = {"CPU": 0.0, "GPU": 0.0}
        for node in ray.nodes():
            if node.get("Alive"):
                for key in most:
                    most[key] = max(most[key], float(node.get("Resources", {}).get(key, 0.0)))
        for key, option, asked in (("CPU", "--cpus-per-shard", self.resources.num_cpus),
                                   ("GPU", "--gpus-per-shard", self.resources.num_gpus)):
            if asked > most[key]:
                raise ValueError(
                    f"{option} {asked:g}: each shard worker would need {asked:g} {key}(s), but "
                    f"this Ray instance offers at most {most[key]:g} per node. Use "
                    f"{option} {most[key]:g} or less, or join a cluster that has them "
                    "(--address).")

    def placement(self) -> list[str]:
        """The Ray node id each shard's serving worker runs on."""
        import ray

        n = self.n_workers()
        self._start(sorted({s % n for s in range(self._n_shards)}))

        def node_id(_self) -> str:
            return ray.get_runtime_context().get_node_id()

        nodes = dict(zip(self._workers, ray.get(
            [w.__ray_call__.remote(node_id) for w in self._workers.values()])))
        return [nodes[s % n] for s in range(self._n_shards)]

    def run_jobs(self, jobs: Sequence[TrainJob], progress: Progress | None = None) -> list[dict]:
        import ray

        total = self.n_workers()
        n = min(total, len(jobs))
        self._start(range(n))
        idle = list(range(n))
        pending = list(jobs)
        running: dict[Any, tuple[int, TrainJob]] = {}
        results: dict[int, dict] = {}
        while pending or running:
            while pending and idle:
                # the cores that no other job takes can go to this one (a deletion that
                # retrains one shard uses them all; a fit keeps one per shard)
                share = max(1, (total - len(running)) // len(pending)) * self._threads
                job, w = pending.pop(0), idle.pop(0)
                job = dataclasses.replace(job, parallel=share)
                running[self._workers[w].train.remote(job)] = (w, job)
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                w, job = running.pop(ref)
                results[job.shard] = ray.get(ref)
                idle.append(w)
                if progress:
                    progress({"shard": job.shard, "done": len(results), "total": len(jobs),
                              **results[job.shard]})
        return [results[job.shard] for job in jobs]

    def run_tasks(self, fn: Callable, calls: Sequence[dict]) -> list:
        """``fn(**kwargs)`` for each of ``calls`` as parallel Ray tasks spread over the cluster
        (data preparation: each reads its part from shared storage, returns a small dict)."""
        import ray

        ensure_ray(self.address)
        task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD", max_retries=3)(fn)
        return ray.get([task.remote(**kw) for kw in calls])

    def predict_proba(self, features: np.ndarray, entries: list[dict]) -> list[np.ndarray | None]:
        import ray

        n = self.n_workers()
        groups: dict[int, list[int]] = {}
        for s, e in enumerate(entries):
            if e["n_samples"]:
                groups.setdefault(s % n, []).append(s)
        self._start(sorted(groups))
        ref = ray.put(np.ascontiguousarray(features, dtype=np.float32))
        calls = {w: self._workers[w].predict_proba.remote([entries[s] for s in shards], ref)
                 for w, shards in groups.items()}
        out: list[np.ndarray | None] = [None] * len(entries)
        for w, res in zip(calls, ray.get(list(calls.values()))):
            for s, p in zip(groups[w], res):
                out[s] = p
        return out

    def worker_memory_mb(self) -> dict[str, float]:
        """Memory of all this pool's worker processes together, in MB: ``uss`` (private to
        them), ``pss`` (plus their share of what they map with others: libraries, Ray's object
        store pages they touched)."""
        import psutil
        import ray

        pids = ray.get([w.__ray_call__.remote(lambda _self: os.getpid())
                        for w in self._workers.values()])
        infos = [psutil.Process(p).memory_full_info() for p in pids]
        return {"uss": sum(i.uss for i in infos) / 2**20, "pss": sum(i.pss for i in infos) / 2**20}

    def shutdown(self, release: bool = False) -> None:
        """Forget the workers; local (non-detached) ones are stopped. Detached workers stay warm
        for the next command (see :func:`release_workers`) unless ``release``."""
        import ray

        if release or not self.detached:
            for w in self._workers.values():
                try:
                    ray.kill(w)
                except Exception:  # an actor already gone is what we wanted
                    pass
        self._workers = {}


def release_workers(store_uri: str, address: str | None = None) -> int:
    """Stop the detached workers of a store on a running cluster; return how many."""
    import ray

    ensure_ray(address)
    ns = store_namespace(store_uri)
    stopped = 0
    for info in ray.util.list_named_actors(all_namespaces=True):
        if info.get("namespace") == ns:
            try:
                ray.kill(ray.get_actor(info["name"], namespace=ns), no_restart=True)
                stopped += 1
            except ValueError:  # gone in the meantime
                pass
    return stopped


class WorkerStartTimeout(RuntimeError):
    """Shard workers did not answer within the start-up timeout (resources the cluster lacks)."""


def _resources_text(total: dict) -> str:
    return f"{total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU in all"


def _start_error(e: Exception) -> Exception:
    """The one-line reason a worker could not start (its constructor's exception)."""
    from .core.runtime import RuntimeMismatch

    text = str(e)
    marker = f"{RuntimeMismatch.__name__}: "
    if marker in text:
        return RuntimeMismatch(text.split(marker, 1)[1].strip().splitlines()[0])
    return RuntimeError(f"A shard worker failed to start: {text.strip().splitlines()[-1]}")


def make_executor(
    backend: str, resources: ResourceConfig | None = None, address: str | None = None
):
    if backend == "local":
        return LocalExecutor()
    if backend == "ray":
        return RayExecutor(resources, address=address)
    raise ValueError(f"The 'backend' parameter must be 'ray' or 'local'. Got {backend!r}.")
