"""The one training loop the fine-tuning style methods share, and the Fisher diagonal.

A method supplies only what differs: the training examples (features, labels and a per-sample
*role*, e.g. retain=0 / forget=1) and its per-batch loss. Shuffling uses a ``torch.Generator``
seeded from the method's seed, so runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from sisa_ray.core.config import check_choice, check_int, check_number
from sisa_ray.core.data import SampleSet

RETAIN, FORGET = 0, 1

BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# An observer of the loop's epochs (a Tune trial reports per epoch, so a scheduler can stop it
# early); one per context, so loops in other threads never see it.
_EPOCH_END: ContextVar[Callable[[nn.Module, int], None] | None] = ContextVar("epoch_end",
                                                                            default=None)


@contextmanager
def on_epoch_end(hook: Callable[[nn.Module, int], None] | None) -> Iterator[None]:
    """Call ``hook(model, epoch)`` after every epoch of :func:`train` run inside the block, the
    model in eval mode (training mode is restored after the hook). The hook must not touch the
    weights: the loop's results are the same with and without it."""
    token = _EPOCH_END.set(hook)
    try:
        yield
    finally:
        _EPOCH_END.reset(token)


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Optimisation settings shared by the methods that train."""

    epochs: int = 1
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    schedule: str = "none"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "epochs", self.epochs, 0)
        check_number(owner, "lr", self.lr, 0.0, strict=True)
        check_choice(owner, "optimizer", self.optimizer, ("sgd", "adam"))
        check_number(owner, "momentum", self.momentum, 0.0)
        check_number(owner, "weight_decay", self.weight_decay, 0.0)
        check_int(owner, "batch_size", self.batch_size, 1)
        check_choice(owner, "schedule", self.schedule, ("none", "cosine", "cosine_epoch"))


def stack(*parts: tuple[SampleSet, np.ndarray | int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate ``(samples, labels_or_None, role)`` parts into features, labels, roles."""
    xs, ys, rs = [], [], []
    for part in parts:
        samples, labels, role = part if len(part) == 3 else (part[0], None, part[1])
        if samples is None or len(samples) == 0:
            continue
        xs.append(samples.features)
        ys.append(samples.labels if labels is None else np.asarray(labels,
                                                                    dtype=samples.labels.dtype))
        rs.append(np.full(len(samples), role, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(rs)


def make_optimizer(model: nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def train(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    roles: np.ndarray,
    batch_loss: BatchLoss,
    cfg: LoopConfig,
    device: torch.device,
    seed: int,
) -> nn.Module:
    """Train ``model`` in place for ``cfg.epochs`` epochs over the shuffled examples."""
    n = len(labels)
    if n == 0 or cfg.epochs == 0:
        return model
    x = torch.from_numpy(np.array(features, dtype=np.float32)).to(device)
    regression = np.issubdtype(np.asarray(labels).dtype, np.floating)
    y = torch.from_numpy(np.array(labels, dtype=np.float32 if regression else np.int64)).to(device)
    r = torch.from_numpy(np.array(roles, dtype=np.int64)).to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, cfg)
    steps = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    # "cosine" anneals per step; "cosine_epoch" per epoch, as some reference code does
    sched = None if cfg.schedule == "none" else torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, steps if cfg.schedule == "cosine" else cfg.epochs)
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            if idx.numel() == 1 and n > 1:
                continue  # batch norm cannot train on one sample
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(model, x[idx], y[idx], r[idx])
            loss.backward()
            opt.step()
            if cfg.schedule == "cosine":
                sched.step()
        if cfg.schedule == "cosine_epoch":
            sched.step()
        if (hook := _EPOCH_END.get()) is not None:
            model.eval()
            hook(model, epoch + 1)
            model.train()
    return model


def cross_entropy(model: nn.Module, x, y, r) -> torch.Tensor:
    """The supervised loss: cross-entropy, or mean squared error when the labels are floats
    (regression, one output)."""
    if y.is_floating_point():
        return nn.functional.mse_loss(model(x).squeeze(1), y)
    return nn.functional.cross_entropy(model(x), y)


def _per_sample_grad_fn(model: nn.Module):
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def nll(p, b, xi, yi):
        out = functional_call(model, (p, b), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    return params, buffers, vmap(grad(nll), in_dims=(None, None, 0, 0))


def _tensors(data: SampleSet) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.array(data.features, dtype=np.float32)),
            torch.from_numpy(np.array(data.labels, dtype=np.int64)))


def fisher_diagonal(
    model: nn.Module, data: SampleSet, device: torch.device, *, kind: str = "expected",
    batch_size: int = 128,
) -> dict[str, torch.Tensor]:
    """Diagonal of the Fisher information, per parameter, averaged over the samples of ``data``
    (model in eval mode).

    ``kind="expected"`` (the true Fisher, as in Golatkar et al.'s and Liu et al.'s code):
    ``mean_i sum_y p(y|x_i) (d/dtheta log p(y|x_i))^2``.
    ``kind="empirical"``: ``mean_i (d/dtheta log p(y_i|x_i))^2`` with the true labels.
    """
    if kind not in ("expected", "empirical"):
        raise ValueError(f"Fisher kind must be 'expected' or 'empirical'. Got {kind!r}.")
    model.eval()
    params, buffers, per_sample = _per_sample_grad_fn(model)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    x_all, y_all = _tensors(data)
    for start in range(0, len(data), batch_size):
        xb = x_all[start:start + batch_size].to(device)
        if kind == "empirical":
            weighted = [(y_all[start:start + batch_size].to(device), None)]
        else:
            with torch.no_grad():
                prob = torch.softmax(model(xb), dim=1)
            weighted = [(torch.full((len(xb),), c, device=device), prob[:, c])
                        for c in range(prob.shape[1])]
        for yb, w in weighted:
            grads = per_sample(params, buffers, xb, yb)
            for k, g in grads.items():
                g2 = g ** 2
                if w is not None:
                    g2 = g2 * w.reshape(-1, *([1] * (g2.ndim - 1)))
                total[k] += g2.sum(0)
    n = max(1, len(data))
    return {k: v / n for k, v in total.items()}


def batch_gradient_importance(
    model: nn.Module, data: SampleSet, device: torch.device, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """Squared mini-batch gradients of the cross-entropy, averaged over batches (model in eval
    mode): the importance estimate of SSD's code (Foster et al. 2023)."""
    model.eval()
    total = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    x_all, y_all = _tensors(data)
    n_batches = 0
    for start in range(0, len(data), batch_size):
        model.zero_grad(set_to_none=True)
        out = model(x_all[start:start + batch_size].to(device))
        nn.functional.cross_entropy(out, y_all[start:start + batch_size].to(device)).backward()
        for k, p in model.named_parameters():
            if p.grad is not None:
                total[k] += p.grad.detach() ** 2
        n_batches += 1
    model.zero_grad(set_to_none=True)
    return {k: v / max(1, n_batches) for k, v in total.items()}
