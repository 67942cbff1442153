"""Fisher masking (Liu et al., "Unlearning with Fisher Masking", arXiv 2310.05331, 2023).

Every rule follows the authors' code (``Yufang-Liu/fisher_unlearning``, ``unlearning/unlearn.py``:
``hessian`` and ``Unlearn.mask_fisher``; ``model/utils.py``: ``fine_tune``):

- The Fisher diagonal is *batch-level*: the data is cut into batches of 128 in its stored order;
  for each batch and each class ``y`` the gradient ``g_y`` of the batch-mean cross-entropy
  against the constant label ``y`` is taken, and ``mean_batch p(y|x) * g_y ** 2`` is added; the
  sum is divided by the number of batches (the last, shorter batch counts as much as the others).
- Only the weights of ``Linear`` and ``Conv2d`` layers are ranked, never biases or batch-norm
  parameters. A Linear weight is one unit per entry; a Conv2d kernel ``W[o, i, :, :]`` is one
  unit scored by the spatial mean of its score and zeroed whole.
- The score is ``F_forget - F_retain``; the ``int(mask_ratio * N)`` units (``N`` units in all)
  with the largest scores are zeroed (ascending order, the last ones taken). When
  ``int(mask_ratio * N)`` is 0 nothing is zeroed (the reference's ``[-0:]`` slice would zero
  every unit; that is a slicing accident, not a rule).
- The repair fine-tunes on the *whole* remaining set: cross-entropy, batches of 128, SGD lr 0.1,
  momentum 0.9, weight decay 1e-4, constant rate (the MNIST configs' ``CONST_LR = True``),
  30 epochs (``--finetune_epochs``); ``epochs=0`` gives the masked model alone.

``mask_ratio`` defaults to 0.02, the CIFAR configs' ``REMOVE_RATIO`` (the MNIST configs use 0.04).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sisa_ray.core.config import check_int, check_number
from sisa_ray.core.data import SampleSet

from ..base import register
from ..loop import RETAIN, LoopConfig, cross_entropy, stack, train

RANKED_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True, kw_only=True)
class FisherMaskingConfig(LoopConfig):
    """Defaults of the authors' code: ``mask_ratio`` 0.02; Fisher batches of 128; repair SGD
    lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, 30 epochs over the whole retain set."""

    mask_ratio: float = 0.02
    fisher_batch_size: int = 128
    epochs: int = 30
    lr: float = 0.1
    weight_decay: float = 1e-4
    batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("FisherMaskingConfig", "fisher_batch_size", self.fisher_batch_size, 1)
        check_number("FisherMaskingConfig", "mask_ratio", self.mask_ratio, 0.0, maximum=1.0)


def ranked_weights(model: nn.Module) -> list[str]:
    """Names of the parameters Fisher masking ranks: the weights of Linear and Conv2d layers."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, RANKED_LAYERS):
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


def batch_fisher(
    model: nn.Module, data: SampleSet, device: torch.device, batch_size: int = 128
) -> dict[str, torch.Tensor]:
    """The reference's batch-level Fisher diagonal of every parameter (model in eval mode).

    ``F = (1 / B) sum_batches sum_y mean_batch(p(y|x)) * (d/dtheta CE_batch(y)) ** 2`` where
    ``CE_batch(y)`` is the batch-mean cross-entropy with every label set to ``y``.
    """
    model.eval()
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    total = {k: torch.zeros_like(p) for k, p in named}
    x_all = torch.from_numpy(np.array(data.features, dtype=np.float32))
    n_batches = 0
    for start in range(0, len(data), batch_size):
        out = model(x_all[start:start + batch_size].to(device))
        prob = torch.softmax(out, dim=1).detach()
        for y in range(out.shape[1]):
            target = torch.full((out.shape[0],), y, dtype=torch.long, device=device)
            loss = nn.functional.cross_entropy(out, target)
            grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True,
                                        allow_unused=True)
            weight = prob[:, y].mean()
            for (k, _), g in zip(named, grads):
                if g is not None:
                    total[k] += weight * g.detach() ** 2
        n_batches += 1
    return {k: v / max(1, n_batches) for k, v in total.items()}


def _unit_scores(score: torch.Tensor) -> torch.Tensor:
    """One score per unit: the entries of a 2-D weight, the spatial mean of each conv kernel."""
    if score.ndim > 2:
        return score.mean(dim=tuple(range(2, score.ndim))).reshape(-1)
    return score.reshape(-1)


@torch.no_grad()
def fisher_mask(
    fisher_forget: dict[str, torch.Tensor], fisher_retain: dict[str, torch.Tensor], ratio: float
) -> dict[str, torch.Tensor]:
    """Boolean masks (True = zero it) of the ``int(ratio * N)`` units with the largest
    ``F_forget - F_retain``, over the ``N`` units of the given weights.

    A 2-D tensor is one unit per entry; a conv kernel ``W[o, i, ...]`` (3-D or more) is one unit
    scored by its spatial mean and masked whole; 1-D tensors (biases) are never masked. Units are
    sorted ascending with a stable sort and the last ``k`` taken, as the reference's
    ``argsort(...)[-k:]`` does.
    """
    names = [n for n in fisher_forget if fisher_forget[n].ndim >= 2]
    scores = torch.cat([_unit_scores(fisher_forget[n] - fisher_retain[n]).cpu() for n in names]) \
        if names else torch.zeros(0)
    k = int(len(scores) * ratio)
    flat = torch.zeros(len(scores), dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, stable=True).indices
        flat[order[-k:]] = True
    masks, start = {}, 0
    for n, f in fisher_forget.items():
        if f.ndim < 2:
            masks[n] = torch.zeros_like(f, dtype=torch.bool)
            continue
        units = f.shape[0] * f.shape[1]
        unit_mask = flat[start:start + units].reshape(f.shape[0], f.shape[1])
        masks[n] = unit_mask.reshape(*unit_mask.shape, *([1] * (f.ndim - 2))).expand_as(f) \
            .to(f.device)
        start += units
    return masks


def mask_model(model: nn.Module, data, config: FisherMaskingConfig, device) -> dict[str, torch.Tensor]:
    """Zero the units most specific to the forget set, in place; returns the masks."""
    names = ranked_weights(model)
    f_forget = batch_fisher(model, data.forget, device, config.fisher_batch_size)
    f_retain = batch_fisher(model, data.retain, device, config.fisher_batch_size)
    masks = fisher_mask({n: f_forget[n] for n in names}, {n: f_retain[n] for n in names},
                        config.mask_ratio)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].masked_fill_(mask, 0.0)
    return masks


@register(
    "fisher_masking", config=FisherMaskingConfig,
    reference="Liu et al., Unlearning with Fisher Masking, 2023 (code: Yufang-Liu/fisher_unlearning)",
)
def fisher_masking(model, data, config: FisherMaskingConfig, device, seed):
    """Zero the weights most specific to the forget set, then fine-tune on the whole retain set."""
    mask_model(model, data, config, device)
    x, y, r = stack((data.retain, RETAIN))
    return train(model, x, y, r, cross_entropy, config, device, seed)
