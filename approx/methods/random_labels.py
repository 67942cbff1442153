"""Random labels (Graves, Nagisetty and Ganesh, "Amnesiac Machine Learning", AAAI 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..base import register
from ..loop import FORGET, RETAIN, LoopConfig, cross_entropy, stack, train


def random_wrong_labels(labels: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A label different from the true one, uniformly among the others."""
    shift = rng.integers(1, n_classes, size=len(labels))
    return (labels + shift) % n_classes


@dataclass(frozen=True, kw_only=True)
class RandomLabelsConfig(LoopConfig):
    """Amnesiac unlearning relabels the forget set at random and trains on it mixed with the
    retain set; defaults of the re-implementation in Foster et al.'s SSD code (``amnesiac``):
    Adam, lr 1e-4, 3 epochs, batch 128, all of the retain set."""

    epochs: int = 3
    lr: float = 1e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    batch_size: int = 128
    retain_fraction: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.retain_fraction <= 1:
            raise ValueError("The 'retain_fraction' parameter of RandomLabelsConfig must be in "
                             f"(0, 1]. Got {self.retain_fraction!r} instead.")


@register(
    "random_labels", config=RandomLabelsConfig,
    reference="Graves et al., Amnesiac Machine Learning, AAAI 2021",
)
def random_labels(model, data, config: RandomLabelsConfig, device, seed):
    """Fine-tune on the forget set with wrong random labels, with the retain set mixed in."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA11]))
    wrong = random_wrong_labels(data.forget.labels, data.forget.n_classes, rng)
    retain = data.retain
    if config.retain_fraction < 1:
        keep = rng.choice(len(retain), size=max(1, int(config.retain_fraction * len(retain))),
                          replace=False)
        retain = retain.take(np.sort(keep))
    x, y, r = stack((data.forget, wrong, FORGET), (retain, RETAIN))
    return train(model, x, y, r, cross_entropy, config, device, seed)
