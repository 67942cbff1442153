"""Selective Synaptic Dampening (Foster, Schoepf and Brintrup, AAAI 2024; arXiv 2308.07707).

Reference code: github.com/if-loops/selective-synaptic-dampening (``src/ssd.py``,
``ParameterPerturber.calc_importance`` and ``modify_weight``; the experiment scripts
``forget_random_main.py``, ``forget_full_class_main.py`` and ``forget_subclass_main.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sisa_ray.core.config import check_int, check_number

from ..base import register
from ..loop import batch_gradient_importance

# The reference's importance batch size per forget kind: its random-forgetting script loads the
# forget set and the full training set in batches of 128; the class and sub-class scripts use
# their ``-b`` default of 64.
REFERENCE_BATCH_SIZE = {"random": 128, "class": 64, "subclass": 64}


@dataclass(frozen=True, kw_only=True)
class SSDConfig:
    """Paper defaults: selection weighting ``alpha = 10``, dampening constant ``lambda = 1``.

    ``batch_size`` is the mini-batch size of the importance estimate (mean squared gradient of
    the mini-batch loss, so it changes the result). ``None`` (the default) follows the reference
    code per forget kind: 128 for random forgetting, 64 for class and sub-class forgetting.
    """

    alpha: float = 10.0
    lam: float = 1.0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("alpha", "lam"):
            check_number("SSDConfig", name, getattr(self, name), 0.0, strict=True)
        if self.batch_size is not None:
            check_int("SSDConfig", "batch_size", self.batch_size, 1)


def importance_batch_size(config: SSDConfig, kind: str) -> int:
    """The importance batch size for a forget request of ``kind`` (see :class:`SSDConfig`)."""
    if config.batch_size is not None:
        return config.batch_size
    return REFERENCE_BATCH_SIZE[kind]


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
    training set D (retain then forget, unshuffled, as the reference's ``ConcatDataset``);
    parameters far more important to the forget set than to D are dampened."""
    batch = importance_batch_size(config, data.request.kind)
    imp_full = batch_gradient_importance(model, data.full(), device, batch)
    imp_forget = batch_gradient_importance(model, data.forget, device, batch)
    ssd_dampen(dict(model.named_parameters()), imp_full, imp_forget, config.alpha, config.lam)
    return model
