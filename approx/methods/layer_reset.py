"""Selective parameter reset with fine-tuning: the NeurIPS 2023 Machine Unlearning Challenge's
6th place on the private leaderboard (S. Karipidis, Kaggle notebook "Unlearning by resetting
layers"; transcribed as ``KGLTop6`` in the ``munl`` benchmark code).

1. Reset the first and the last layer of the model (``conv1`` and ``fc`` of the ResNet-18 of the
   challenge; here the first and the last Linear/Conv layer) to a fresh initialisation.
2. Warm-up: minimise ``KL(p_orig^T || p_model^T)`` on the validation set, the original model's
   softened outputs at temperature ``T`` being the target (``F.kl_div(..., "batchmean")``, no
   ``T^2`` factor); SGD lr 9e-4, momentum 0.9, weight decay 5e-4, 3 epochs.
3. Fine-tune on the retain set with ``CE(z, y) + softCE(z / T, p_orig^T) + KL(p_orig^T ||
   p_model^T)``, where ``softCE(z / T, q) = mean_i -sum_c q_ic log_softmax(z_i / T)_c``;
   SGD lr 1e-3, momentum 0.9, weight decay 5e-4, cosine annealing stepped once per epoch
   (``T_max`` = the number of epochs), 3 epochs.

Batches of 64, ``T = 5``; the original model is the teacher throughout, in eval mode.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from sisa_ray.core.config import check_int, check_number

from ..base import register
from ..loop import RETAIN, LoopConfig, stack, train


@dataclass(frozen=True, kw_only=True)
class LayerResetConfig(LoopConfig):
    """The notebook's defaults: retain phase SGD lr 1e-3, momentum 0.9, weight decay 5e-4,
    3 epochs, per-epoch cosine; warm-up lr 9e-4, 3 epochs; batch 64; temperature 5."""

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    schedule: str = "cosine_epoch"
    warmup_epochs: int = 3
    warmup_lr: float = 9e-4
    temperature: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("LayerResetConfig", "warmup_epochs", self.warmup_epochs, 0)
        check_number("LayerResetConfig", "warmup_lr", self.warmup_lr, 0.0, strict=True)
        check_number("LayerResetConfig", "temperature", self.temperature, 0.0, strict=True)


def reset_layers(model: nn.Module) -> list[str]:
    """Re-initialise the first and the last Linear/Conv layer of ``model`` in place (from the
    seeded global RNG); returns their module names."""
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not layers:
        raise ValueError("Layer reset needs a model with Linear or Conv layers. Got "
                         f"{type(model).__name__} with none.")
    chosen = [layers[0]] if len(layers) == 1 else [layers[0], layers[-1]]
    for _, m in chosen:
        m.reset_parameters()
    return [name for name, _ in chosen]


def distillation_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """``KL(softmax(teacher / t) || softmax(logits / t))`` summed over classes, mean over rows."""
    return nn.functional.kl_div(torch.log_softmax(logits / t, dim=1),
                                torch.softmax(teacher_logits / t, dim=1), reduction="batchmean")


def soft_cross_entropy(logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """``mean_i -sum_c softmax(teacher_i / t)_c * log_softmax(logits_i / t)_c``."""
    target = torch.softmax(teacher_logits / t, dim=1)
    return (-(target * torch.log_softmax(logits / t, dim=1)).sum(1)).mean()


def retain_loss(logits, teacher_logits, y, t: float) -> torch.Tensor:
    """The fine-tuning loss: cross-entropy + soft cross-entropy + KL to the teacher."""
    return (nn.functional.cross_entropy(logits, y) + soft_cross_entropy(logits, teacher_logits, t)
            + distillation_kl(logits, teacher_logits, t))


@register(
    "layer_reset", config=LayerResetConfig, needs=("forget", "retain", "validation"),
    reference="NeurIPS 2023 Machine Unlearning Challenge, 6th place (Karipidis, "
              "'Unlearning by resetting layers')",
)
def layer_reset(model, data, config: LayerResetConfig, device, seed):
    """Reset the first and last layers, pull the model back to the original's outputs on the
    validation set, then fine-tune on the retain set against labels and the original."""
    timings: dict[str, float] = {}
    teacher = copy.deepcopy(model).eval()
    t = config.temperature

    def teacher_out(x):
        with torch.no_grad():
            return teacher(x)

    def warmup_batch(m, x, y, r):
        return distillation_kl(m(x), teacher_out(x), t)

    def retain_batch(m, x, y, r):
        return retain_loss(m(x), teacher_out(x), y, t)

    reset_layers(model)
    t0 = time.perf_counter()
    warm = LoopConfig(epochs=config.warmup_epochs, lr=config.warmup_lr, momentum=config.momentum,
                      weight_decay=config.weight_decay, batch_size=config.batch_size)
    x, y, r = stack((data.validation, RETAIN))
    train(model, x, y, r, warmup_batch, warm, device, seed + 1)
    timings["warmup"] = time.perf_counter() - t0
    x, y, r = stack((data.retain, RETAIN))
    train(model, x, y, r, retain_batch, config, device, seed)
    timings["finetune"] = time.perf_counter() - t0 - timings["warmup"]
    return model, timings
