"""Where shard trainers run: in this process (``LocalExecutor``) or as Ray actors (``RayExecutor``).

This module and the CLI are the only parts of ``sisa_ray`` that import Ray. Both executors speak
the same small interface, so the ensemble, the tests and failure injection do not care which runs.

Ray actors are long-lived and own their shard (they serve predictions from the live checkpoint).
They reserve no CPU while idle by default, because S actors that each held a CPU would deadlock on
fewer than S CPUs; instead the driver keeps at most ``max_concurrent`` shards *training* at once,
by default the cluster's CPUs divided by the threads per shard (or its GPUs, for GPU actors).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .core.config import ResourceConfig
from .core.runtime import check_capability
from .shard import ShardTrainer, TrainJob

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]


class LocalExecutor:
    """Runs shard trainers one after another in this process. No Ray needed."""

    name = "local"

    def __init__(self, trainer_cls: type = ShardTrainer) -> None:
        self.trainer_cls = trainer_cls
        self._trainers: dict[int, Any] = {}
        self._store_uri: str | None = None

    def bind(self, store_uri: str, n_shards: int, threads: int = 1,
             env: dict[str, str] | None = None) -> None:
        # In-process trainers cannot change this process's environment: refuse now, before a
        # deletion is acknowledged, if it does not honour the store's pinned runtime.
        check_capability((env or {}).get("ATEN_CPU_CAPABILITY"))
        if store_uri != self._store_uri:
            self._trainers = {}
            self._store_uri = store_uri
        self._n_shards = n_shards

    def _trainer(self, shard: int):
        if shard not in self._trainers:
            self._trainers[shard] = self.trainer_cls(self._store_uri, shard)
        return self._trainers[shard]

    def run_jobs(self, jobs: Sequence[TrainJob], progress: Progress | None = None) -> list[dict]:
        results = []
        for job in jobs:
            res = self._trainer(job.shard).train(job)
            results.append(res)
            if progress:
                progress({"shard": job.shard, "done": len(results), "total": len(jobs), **res})
        return results

    def reload(self) -> list[int | None]:
        return [self._trainer(s).reload() for s in range(self._n_shards)]

    def placement(self) -> list[str]:
        return ["local"] * self._n_shards

    def predict_proba(self, features: np.ndarray) -> list[np.ndarray | None]:
        return [self._trainer(s).predict_proba(features) for s in range(self._n_shards)]

    def shutdown(self) -> None:
        self._trainers = {}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray: ``address=None`` starts (or reuses) a local instance, ``"auto"`` or
    ``RAY_ADDRESS`` joins a running cluster."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address or os.environ.get("RAY_ADDRESS"):
        kwargs["address"] = address or os.environ["RAY_ADDRESS"]
    elif num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


class RayExecutor:
    """One named Ray actor per shard; training bounded to the cluster's capacity."""

    name = "ray"

    def __init__(
        self,
        resources: ResourceConfig | None = None,
        *,
        address: str | None = None,
        trainer_cls: type = ShardTrainer,
        max_restarts: int = 3,
    ) -> None:
        self.resources = resources or ResourceConfig()
        self.address = address
        self.trainer_cls = trainer_cls
        self.max_restarts = max_restarts
        self._actors: list[Any] = []
        self._store_uri: str | None = None
        self._threads = 1
        self.startup_seconds = 0.0

    def bind(self, store_uri: str, n_shards: int, threads: int = 1,
             env: dict[str, str] | None = None) -> None:
        import ray

        ensure_ray(self.address)
        if store_uri == self._store_uri and len(self._actors) == n_shards:
            return
        self.shutdown()
        self._store_uri, self._threads = store_uri, threads
        cls = ray.remote(
            # the store's pinned runtime (CPU capability), set before torch loads in the actor
            runtime_env={"env_vars": dict(env or {})},
            num_cpus=self.resources.num_cpus,
            num_gpus=self.resources.num_gpus,
            max_restarts=self.max_restarts,
            max_task_retries=self.max_restarts,
            # two threads: predictions are served from the live model while a retrain runs
            max_concurrency=2,
            # spread shards over the nodes of a cluster (one node: no effect)
            scheduling_strategy="SPREAD",
        )(self.trainer_cls)
        t0 = time.perf_counter()
        self._actors = [cls.remote(store_uri, s) for s in range(n_shards)]
        # Wait for every actor process to be up, so start-up is not billed to training; an actor
        # that refuses the store's runtime fails here, before anything is recorded.
        try:
            ray.get([a.ping.remote() for a in self._actors])
        except ray.exceptions.ActorDiedError as e:
            self.shutdown()
            raise _start_error(e) from None
        self.startup_seconds = time.perf_counter() - t0
        log.info("%d shard actors ready in %.1fs", n_shards, self.startup_seconds)

    def placement(self) -> list[str]:
        """The Ray node id each shard actor runs on."""
        import ray

        def node_id(_self) -> str:
            return ray.get_runtime_context().get_node_id()

        return ray.get([a.__ray_call__.remote(node_id) for a in self._actors])

    def max_concurrent(self) -> int:
        import ray

        if self.resources.max_concurrent is not None:
            return self.resources.max_concurrent
        total = ray.cluster_resources()
        if self.resources.num_gpus > 0:
            return max(1, int(total.get("GPU", 0) / self.resources.num_gpus))
        return max(1, int(total.get("CPU", 1)) // self._threads)

    def run_jobs(self, jobs: Sequence[TrainJob], progress: Progress | None = None) -> list[dict]:
        import ray

        limit = self.max_concurrent()
        pending = list(jobs)
        running: dict[Any, int] = {}
        results: dict[int, dict] = {}
        while pending or running:
            while pending and len(running) < limit:
                job = pending.pop(0)
                running[self._actors[job.shard].train.remote(job)] = job.shard
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                shard = running.pop(ref)
                results[shard] = ray.get(ref)
                if progress:
                    progress({"shard": shard, "done": len(results), "total": len(jobs),
                              **results[shard]})
        return [results[job.shard] for job in jobs]

    def reload(self) -> list[int | None]:
        import ray

        return ray.get([a.reload.remote() for a in self._actors])

    def predict_proba(self, features: np.ndarray) -> list[np.ndarray | None]:
        import ray

        ref = ray.put(np.ascontiguousarray(features, dtype=np.float32))
        return ray.get([a.predict_proba.remote(ref) for a in self._actors])

    def shutdown(self) -> None:
        import ray

        for a in self._actors:
            try:
                ray.kill(a)
            except Exception:  # an actor already gone is what we wanted
                pass
        self._actors = []
        self._store_uri = None


def _start_error(e: Exception) -> Exception:
    """The one-line reason a shard actor could not start (its constructor's exception)."""
    from .core.runtime import RuntimeMismatch

    text = str(e)
    for cls in (RuntimeMismatch,):
        marker = f"{cls.__name__}: "
        if marker in text:
            return cls(text.split(marker, 1)[1].strip().splitlines()[0])
    return RuntimeError(f"A shard actor failed to start: {text.strip().splitlines()[-1]}")


def make_executor(
    backend: str, resources: ResourceConfig | None = None, address: str | None = None
):
    if backend == "local":
        return LocalExecutor()
    if backend == "ray":
        return RayExecutor(resources, address=address)
    raise ValueError(f"The 'backend' parameter must be 'ray' or 'local'. Got {backend!r}.")
