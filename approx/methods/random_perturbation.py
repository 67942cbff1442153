"""Random perturbation: Gaussian noise scaled per layer, then fine-tuning on the retain set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sisa_ray.core.config import check_number

from ..base import register
from ..loop import RETAIN, LoopConfig, cross_entropy, stack, train


@dataclass(frozen=True, kw_only=True)
class RandomPerturbationConfig(LoopConfig):
    """Each parameter tensor gets noise N(0, (beta * sigma_layer)^2), sigma_layer being the
    standard deviation of that tensor's values; then ``epochs`` of fine-tuning on the retain set
    (the noise-then-repair baseline, cf. Golatkar et al. 2020, Section 5)."""

    beta: float = 0.1
    epochs: int = 1
    lr: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("RandomPerturbationConfig", "beta", self.beta, 0.0)


@torch.no_grad()
def perturb(model: torch.nn.Module, beta: float, gen: torch.Generator) -> None:
    """Add ``beta * sigma * z`` to each parameter, ``z`` standard normal drawn from the CPU
    generator ``gen`` (one tensor per parameter, in ``parameters()`` order) and ``sigma`` the
    tensor's standard deviation (its absolute value for a single number)."""
    for p in model.parameters():
        sigma = p.std() if p.numel() > 1 else p.abs().mean()
        z = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
        p.add_(z * beta * sigma)


@register(
    "random_perturbation", config=RandomPerturbationConfig, needs=("retain",),
    reference="Gaussian perturbation then retain fine-tuning (Golatkar et al. 2020 baselines)",
)
def random_perturbation(model, data, config: RandomPerturbationConfig, device, seed):
    perturb(model, config.beta, torch.Generator().manual_seed(seed))
    x, y, r = stack((data.retain, RETAIN))
    return train(model, x, y, r, cross_entropy, config, device, seed)
