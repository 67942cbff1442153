"""Fisher forgetting (Golatkar, Achille and Soatto, "Eternal Sunshine of the Spotless Net",
CVPR 2020).

Reference code: github.com/AdityaGolatkar/SelectiveForgetting, ``Forgetting.ipynb`` (``hessian``
and ``get_mean_var``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sisa_ray.core.config import check_number

from ..base import register
from ..loop import fisher_diagonal


@dataclass(frozen=True, kw_only=True)
class FisherForgettingConfig:
    """Defaults of the authors' code (``Forgetting.ipynb``): expected Fisher on the retain set
    (model in eval mode, one sample at a time), ``alpha = 1e-6``, inverse Fisher clamped at 1e3
    (1e2 for the output layer), variance averaged over dimension 1 for tensors of two or more
    dimensions (a matrix's row; a conv kernel ``(out, in, kh, kw)`` keeps its spatial positions
    and is averaged over input channels only), variance x10 for the output layer and
    one-dimensional parameters; for class forgetting the forgotten class's output row (weight and
    bias) is set to 0 with variance 1e-4 before the x10. The reference recognises the output
    layer as the parameters whose first dimension equals the number of classes; here it is the
    model's last ``nn.Linear``, the same layer without mistaking a hidden layer that happens to
    have as many units as there are classes."""

    alpha: float = 1e-6
    max_var: float = 1e3
    max_var_output: float = 1e2

    def __post_init__(self) -> None:
        for name in ("alpha", "max_var", "max_var_output"):
            check_number("FisherForgettingConfig", name, getattr(self, name), 0.0, strict=True)


def output_layer(model: nn.Module) -> nn.Linear:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError("Fisher forgetting needs a model whose output layer is nn.Linear.")
    return layers[-1]


@torch.no_grad()
def fisher_noise_scale(
    model: nn.Module, fisher: dict[str, torch.Tensor], config: FisherForgettingConfig,
    forget_class: int | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(mean, variance)`` of the Gaussian each parameter is redrawn from."""
    out_ids = {id(p) for p in output_layer(model).parameters()}
    dist = {}
    for name, p in model.named_parameters():
        is_out = id(p) in out_ids
        var = (1.0 / (fisher[name] + 1e-8)).clamp(max=config.max_var)
        if is_out:
            var = var.clamp(max=config.max_var_output)
        var = config.alpha * var
        if p.ndim > 1:
            var = var.mean(dim=1, keepdim=True).expand_as(p).clone()
        mu = p.detach().clone()
        if is_out and forget_class is not None:
            mu[forget_class] = 0
            var[forget_class] = 1e-4
        if is_out or p.ndim == 1:
            var = var * 10
        dist[name] = (mu, var)
    return dist


@register(
    "fisher_forgetting", config=FisherForgettingConfig,
    reference="Golatkar et al., Eternal Sunshine of the Spotless Net, CVPR 2020",
)
def fisher_forgetting(model, data, config: FisherForgettingConfig, device, seed):
    """Redraw each weight from N(w, alpha * F_retain^-1): directions the retain set does not
    pin down are scrubbed by noise. The standard normal draws come from a CPU generator seeded
    with ``seed``, one tensor per parameter in ``named_parameters`` order."""
    fisher = fisher_diagonal(model, data.retain, device, kind="expected")
    forget_class = data.request.label if data.request.kind == "class" else None
    dist = fisher_noise_scale(model, fisher, config, forget_class)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mu, var = dist[name]
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
            p.copy_(mu + var.sqrt() * noise)
    return model
