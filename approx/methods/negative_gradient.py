"""Negative gradient: gradient ascent on the forget set (with an optional retain term)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sisa_ray.core.config import check_number

from ..base import register
from ..loop import FORGET, RETAIN, LoopConfig, stack, train


@dataclass(frozen=True, kw_only=True)
class NegativeGradientConfig(LoopConfig):
    """Gradient ascent on the forget set, the "NegGrad" baseline (Golatkar et al. 2020; Kurmanji
    et al., SCRUB, 2023, whose NegGrad+ uses SGD lr 0.01): 1 epoch, SGD lr 0.01.
    ``retain_weight > 0`` adds descent on the retain set (NegGrad+); the default 0 is plain
    ascent. No official defaults exist for plain ascent; these are the SCRUB code's settings."""

    epochs: int = 1
    lr: float = 0.01
    retain_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("NegativeGradientConfig", "retain_weight", self.retain_weight, 0.0)


@register(
    "negative_gradient", config=NegativeGradientConfig, needs=("forget",),
    reference="Golatkar et al. 2020 (NegGrad baseline); Kurmanji et al. 2023 (NegGrad+)",
)
def negative_gradient(model, data, config: NegativeGradientConfig, device, seed):
    """Minimise ``-CE(forget) + retain_weight * CE(retain)``."""
    parts = [(data.forget, FORGET)]
    if config.retain_weight > 0 and data.retain is not None:
        parts.append((data.retain, RETAIN))
    x, y, r = stack(*parts)

    def loss(m, xb, yb, rb):
        per = nn.functional.cross_entropy(m(xb), yb, reduction="none")
        sign = torch.where(rb == FORGET, -1.0, config.retain_weight)
        return (sign * per).mean()

    return train(model, x, y, r, loss, config, device, seed)
