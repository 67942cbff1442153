"""Training of one shard, slice step by slice step, deterministically.

Step ``r`` trains on slices ``0..r`` of the shard for ``epochs_per_step(...)[r]`` epochs. The sample
order of each epoch comes from :func:`~sisa_ray.core.plan.training_order`, and every random stream a
model might draw from (dropout, augmentation) is seeded from ``(seed, shard, step, epoch)`` inside
a forked RNG, so the process-global generator is left as it was and nothing depends on how much
randomness other data consumed. Together with deterministic algorithms and a fixed thread count,
resuming from the checkpoint after step ``r-1`` gives exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import ShardingConfig, TrainingConfig
from .plan import derive_seed, epochs_per_step, training_order

_INIT_TAG = 0x1417
_STEP_TAG = 0x57E9


def supervised_loss(task: str, reduction: str = "mean"):
    """Cross-entropy for classification; mean squared error on the single output for regression."""
    if task == "regression":
        mse = nn.MSELoss(reduction=reduction)
        return lambda out, y: mse(out.squeeze(1), y)
    return nn.CrossEntropyLoss(reduction=reduction)


_det_lock = threading.Lock()
_det_users = 0
_det_saved: tuple[int, bool] | None = None


@contextlib.contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Deterministic kernels and a fixed intra-op thread count, restored when the last user in
    this process leaves. The settings are process-wide, so overlapping users (a prediction
    served while a shard trains in the same worker) share one setting instead of each restoring
    the other's 'previous' state in the middle of its work."""
    global _det_users, _det_saved
    with _det_lock:
        if _det_users == 0:
            _det_saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(True)
        _det_users += 1
    try:
        yield
    finally:
        with _det_lock:
            _det_users -= 1
            if _det_users == 0 and _det_saved is not None:
                torch.use_deterministic_algorithms(_det_saved[1])
                torch.set_num_threads(_det_saved[0])


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, then restore the caller's RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


def init_seed(sharding: ShardingConfig, shard: int) -> int:
    """Seed of shard ``shard``'s weight initialisation."""
    return derive_seed(_INIT_TAG, sharding.seed, shard)


def make_optimizer(model: nn.Module, training: TrainingConfig) -> torch.optim.Optimizer:
    if training.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=training.lr, weight_decay=training.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(), lr=training.lr, momentum=training.momentum,
        weight_decay=training.weight_decay,
    )


@dataclass(frozen=True)
class StepResult:
    """What one slice step did."""

    step: int
    n_samples: int
    sample_steps: int
    seconds: float
    ids: np.ndarray


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    features: np.ndarray,
    labels: np.ndarray,
    ids: np.ndarray,
    slice_of: np.ndarray,
    *,
    sharding: ShardingConfig,
    training: TrainingConfig,
    shard: int,
    start_step: int,
    device: torch.device,
    task: str = "classification",
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    parallel: int = 1,
) -> Iterator[StepResult]:
    """Train steps ``start_step..R-1`` in place, yielding after each so the caller checkpoints.

    ``model`` and ``optimizer`` must hold the state after step ``start_step - 1`` (or a fresh
    initialisation when ``start_step`` is 0). ``slice_of[i]`` is the slice of sample ``ids[i]``.
    ``augment`` transforms each mini-batch's inputs, drawing its randomness from torch's global
    stream, which is seeded per ``(seed, shard, step, epoch)`` like dropout's.
    ``parallel``: threads that compute the micro-batches of ``training.micro_batches > 1``
    (it changes the speed, never the bits).
    """
    epochs = epochs_per_step(training, sharding.n_slices)
    # from_numpy needs writable memory; Arrow-backed arrays are read-only.
    x_all = torch.from_numpy(np.array(features, dtype=np.float32)).to(device)
    regression = task == "regression"
    y_all = torch.from_numpy(np.array(labels, dtype=np.float32 if regression else np.int64))
    y_all = y_all.to(device)
    loss_fn = supervised_loss(task)
    bs = training.batch_size
    micro = (MicroBatches(model, task, training.micro_batches, parallel)
             if training.micro_batches > 1 else None)
    try:
        for step in range(start_step, sharding.n_slices):
            t0 = time.perf_counter()
            rows = np.flatnonzero(slice_of <= step)
            step_ids = ids[rows]
            n = int(rows.size)
            model.train()
            for epoch in range(epochs[step]):
                if n == 0:
                    break
                order = rows[training_order(step_ids, sharding.seed, shard, step, epoch)]
                order_t = torch.as_tensor(order, device=device)
                with seeded(derive_seed(_STEP_TAG, sharding.seed, shard, step, epoch), device):
                    for start, stop in batch_bounds(n, bs):
                        idx = order_t[start:stop]
                        optimizer.zero_grad(set_to_none=True)
                        xb = x_all[idx] if augment is None else augment(x_all[idx])
                        if micro is not None:
                            micro.backward(xb, y_all[idx])
                        else:
                            with single_sample_batch_norm(model, stop - start):
                                loss = loss_fn(model(xb), y_all[idx])
                            loss.backward()
                        optimizer.step()
            yield StepResult(
                step=step, n_samples=n, sample_steps=n * epochs[step],
                seconds=time.perf_counter() - t0, ids=step_ids,
            )
    finally:
        if micro is not None:
            micro.close()


_RANDOM_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout)


def micro_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the ``min(parts, n)`` contiguous micro-batches of a batch of ``n``:
    sizes differ by at most one, the larger first. A pure function of ``n`` and ``parts``."""
    k = min(parts, n)
    q, r = divmod(n, k)
    bounds, start = [], 0
    for i in range(k):
        stop = start + q + (i < r)
        bounds.append((start, stop))
        start = stop
    return bounds


class MicroBatches:
    """A mini-batch's gradients as the sum, in micro-batch order, of each micro-batch's own:
    ``sum of losses / batch size`` backpropagated on one thread. Each micro-batch's gradients
    are the same bits whichever thread computes them, on the model or on a replica holding its
    weights, and the sum's order is fixed, so the result does not depend on ``parallel``: a
    deletion may use every idle core and still reproduce a fit that used one. (Models with
    batch norm are refused by the config: their statistics would be per micro-batch, and each
    replica would update the running ones on its own.)"""

    def __init__(self, model: nn.Module, task: str, parts: int, parallel: int) -> None:
        drawing = [type(m).__name__ for m in model.modules() if isinstance(m, _RANDOM_LAYERS)]
        if drawing:
            # threads would draw from torch's one global stream in whatever order they ran
            raise ValueError(f"micro_batches > 1 cannot train a model with {drawing[0]}: its "
                             "random draws would depend on the threads' timing. Use "
                             "micro_batches=1.")
        self.model = model
        self.parts = parts
        self.loss_fn = supervised_loss(task, reduction="sum")
        n = max(1, min(parallel, parts))
        self.replicas = [model] + [copy.deepcopy(model) for _ in range(n - 1)]
        # one intra-op thread in each: MKL keeps its thread count per thread, and a new
        # thread would otherwise start with its default (every core)
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="micro-batch",
                                       initializer=torch.set_num_threads,
                                       initargs=(1,)) if n > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def _grads(self, replica: int, x: torch.Tensor, y: torch.Tensor,
               batch: int) -> tuple[torch.Tensor, ...]:
        net = self.replicas[replica]
        loss = self.loss_fn(net(x), y) / batch
        return torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad])

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Set the model's ``.grad`` to the gradients of the mean loss of ``(x, y)``."""
        n = int(x.shape[0])
        bounds = micro_bounds(n, self.parts)
        if self.pool is None:
            grads = [self._grads(0, x[a:b], y[a:b], n) for a, b in bounds]
        else:
            with torch.no_grad():  # every replica starts the batch at the model's weights
                for rep in self.replicas[1:]:
                    for mine, theirs in zip(rep.state_dict().values(),
                                            self.model.state_dict().values()):
                        mine.copy_(theirs)
            n_rep = len(self.replicas)
            futures = [self.pool.submit(self._grads, i % n_rep, x[a:b], y[a:b], n)
                       for i, (a, b) in enumerate(bounds)]
            grads = [f.result() for f in futures]
        total = [g.clone() for g in grads[0]]
        for more in grads[1:]:
            for t, g in zip(total, more):
                t.add_(g)
        for p, g in zip((p for p in self.model.parameters() if p.requires_grad), total):
            p.grad = g


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextlib.contextmanager
def single_sample_batch_norm(model: nn.Module, batch: int) -> Iterator[None]:
    """Make a batch of one sample trainable: batch norm cannot take batch statistics of one
    sample, so for such a batch its layers normalise with their running statistics (and do not
    update them). A slice step left with one sample after a deletion is the only way to get one
    (:func:`batch_bounds` never leaves a single sample at the end otherwise), and a fresh fit on
    the same samples hits the same rule, so every step stays trainable and exact."""
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.training] \
        if batch == 1 else []
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each mini-batch; a last batch of one sample joins the previous one,
    because batch norm cannot train on a single sample."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


@torch.no_grad()
def predict_proba(
    model: nn.Module, features: np.ndarray, device: torch.device, batch_size: int = 1024,
    task: str = "classification",
) -> np.ndarray:
    """Softmax probabilities, float64, shape (N, n_classes); for regression the raw output,
    shape (N, 1)."""
    model.eval()
    out = []
    x = torch.from_numpy(np.array(features, dtype=np.float32))
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start:start + batch_size].to(device))
        out.append((logits.double() if task == "regression"
                    else torch.softmax(logits.double(), dim=1)).cpu().numpy())
    if not out:
        return np.zeros((0, 0))
    return np.concatenate(out)
