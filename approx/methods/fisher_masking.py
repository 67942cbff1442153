"""Fisher masking (Liu et al., "Unlearning with Fisher Masking", arXiv 2310.05331, 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sisa_ray.core.config import check_int, check_number

from ..base import register
from ..loop import RETAIN, LoopConfig, cross_entropy, fisher_diagonal, stack, train


@dataclass(frozen=True, kw_only=True)
class FisherMaskingConfig(LoopConfig):
    """Defaults of the authors' code (``Yufang-Liu/fisher_unlearning``): ``mask_ratio`` 0.02 of
    the parameters zeroed, ranked by ``F_forget - F_retain`` (expected Fisher; conv kernels scored
    by their spatial mean); then the optional repair: SGD lr 0.1, momentum 0.9, weight decay 1e-4,
    30 epochs on a 50-sample subset of the retain set (``epochs=0`` skips it, as the paper's
    headline numbers do)."""

    mask_ratio: float = 0.02
    epochs: int = 30
    lr: float = 0.1
    weight_decay: float = 1e-4
    finetune_samples: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("FisherMaskingConfig", "finetune_samples", self.finetune_samples, 1)
        check_number("FisherMaskingConfig", "mask_ratio", self.mask_ratio, 0.0, maximum=1.0)


@torch.no_grad()
def fisher_mask(
    fisher_forget: dict[str, torch.Tensor], fisher_retain: dict[str, torch.Tensor], ratio: float
) -> dict[str, torch.Tensor]:
    """Boolean masks (True = zero it) of exactly ``round(ratio * n_params)`` parameters with the
    largest ``F_forget - F_retain`` (ties broken by position, deterministically)."""
    names = list(fisher_forget)
    per_param = []
    for n in names:
        score = fisher_forget[n] - fisher_retain[n]
        if score.ndim > 2:  # conv kernel: one score per (out, in) pair, its spatial mean
            score = score.mean(dim=tuple(range(2, score.ndim)), keepdim=True).expand_as(score)
        per_param.append(score.reshape(-1))
    scores = torch.cat(per_param)
    k = int(round(ratio * scores.numel()))
    flat = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores.cpu(), descending=True, stable=True).indices
        flat[order[:k]] = True
    masks, start = {}, 0
    for n in names:
        size = fisher_forget[n].numel()
        masks[n] = flat[start:start + size].reshape(fisher_forget[n].shape).to(
            fisher_forget[n].device)
        start += size
    return masks


@register(
    "fisher_masking", config=FisherMaskingConfig,
    reference="Liu et al., Unlearning with Fisher Masking, 2023",
)
def fisher_masking(model, data, config: FisherMaskingConfig, device, seed):
    """Zero the parameters most specific to the forget set, then fine-tune on the retain set."""
    masks = fisher_mask(
        fisher_diagonal(model, data.forget, device), fisher_diagonal(model, data.retain, device),
        config.mask_ratio,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.masked_fill_(masks[name], 0.0)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF15]))
    n = min(config.finetune_samples, len(data.retain))
    subset = data.retain.take(np.sort(rng.choice(len(data.retain), n, replace=False)))
    x, y, r = stack((subset, RETAIN))
    return train(model, x, y, r, cross_entropy, config, device, seed)
