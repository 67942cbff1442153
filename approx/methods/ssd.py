"""Selective Synaptic Dampening (Foster, Schoepf and Brintrup, AAAI 2024; arXiv 2308.07707)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sisa_ray.core.config import check_int, check_number

from ..base import register
from ..loop import batch_gradient_importance


@dataclass(frozen=True, kw_only=True)
class SSDConfig:
    """Paper defaults: selection weighting ``alpha = 10``, dampening constant ``lambda = 1``;
    importances from mini-batches of 64 as in the authors' code."""

    alpha: float = 10.0
    lam: float = 1.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("alpha", "lam"):
            check_number("SSDConfig", name, getattr(self, name), 0.0, strict=True)
        check_int("SSDConfig", "batch_size", self.batch_size, 1)


@torch.no_grad()
def ssd_dampen(
    params: dict[str, torch.Tensor], imp_full: dict[str, torch.Tensor],
    imp_forget: dict[str, torch.Tensor], alpha: float, lam: float,
) -> dict[str, torch.Tensor]:
    """The SSD rule, in place: where ``I_f > alpha * I_D``, multiply the parameter by
    ``beta = min(lam * I_D / I_f, 1)``; elsewhere leave it. Returns the multipliers."""
    factors = {}
    for name, p in params.items():
        i_d, i_f = imp_full[name], imp_forget[name]
        selected = i_f > alpha * i_d
        beta = torch.where(i_f > 0, lam * i_d / i_f.clamp_min(torch.finfo(i_f.dtype).tiny),
                           torch.ones_like(i_f)).clamp(max=1.0)
        factor = torch.where(selected, beta, torch.ones_like(p))
        p.mul_(factor)
        factors[name] = factor
    return factors


@register(
    "ssd", config=SSDConfig,
    reference="Foster et al., Fast Machine Unlearning Without Retraining Through Selective "
              "Synaptic Dampening, AAAI 2024",
)
def ssd(model, data, config: SSDConfig, device, seed):
    """Importances are mean squared (mini-batch) gradients on the forget set and on the full
    training set; parameters far more important to the forget set are dampened."""
    imp_full = batch_gradient_importance(model, data.full(), device, config.batch_size)
    imp_forget = batch_gradient_importance(model, data.forget, device, config.batch_size)
    ssd_dampen(dict(model.named_parameters()), imp_full, imp_forget, config.alpha, config.lam)
    return model
