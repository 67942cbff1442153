"""Fine-tuning on the retain set only: forgetting by catastrophic forgetting."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import register
from ..loop import RETAIN, LoopConfig, cross_entropy, stack, train


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(LoopConfig):
    """Defaults of the NeurIPS 2023 Machine Unlearning challenge starting kit's ``unlearning``
    baseline (github.com/unlearning-challenge/starting-kit): SGD, lr 0.1, momentum 0.9, weight
    decay 5e-4, 5 epochs, cosine annealing with ``T_max = epochs`` stepped once per epoch
    (``cosine_epoch``), batch 128."""

    epochs: int = 5
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine_epoch"


@register(
    "finetune", config=FinetuneConfig, needs=("retain",),
    tasks=("classification", "regression"),
    reference="NeurIPS 2023 Machine Unlearning challenge starting kit (Triantafillou et al.)",
)
def finetune(model, data, config: FinetuneConfig, device, seed):
    """Train on the retain set only; the forget set is never seen again."""
    x, y, r = stack((data.retain, RETAIN))
    return train(model, x, y, r, cross_entropy, config, device, seed)
