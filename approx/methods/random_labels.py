"""Random labels (Graves, Nagisetty and Ganesh, "Amnesiac Machine Learning", AAAI 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sisa_ray.core.config import check_number

from ..base import register
from ..loop import FORGET, RETAIN, LoopConfig, cross_entropy, stack, train


def random_wrong_labels(labels: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A label different from the true one, uniformly among the others."""
    shift = rng.integers(1, n_classes, size=len(labels))
    return (labels + shift) % n_classes


def shifted_targets(y: np.ndarray, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    """Regression "random labels": each target moved by U(lo, hi), up or down at random."""
    sign = rng.choice([-1.0, 1.0], size=len(y))
    return (y + sign * rng.uniform(lo, hi, size=len(y))).astype(y.dtype)


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
    # regression: the target moves by U(shift_min, shift_max) up or down (e.g. 3-6 years of age)
    shift_min: float = 3.0
    shift_max: float = 6.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("RandomLabelsConfig", "shift_min", self.shift_min, 0.0)
        check_number("RandomLabelsConfig", "shift_max", self.shift_max, self.shift_min)
        check_number("RandomLabelsConfig", "retain_fraction", self.retain_fraction, 0.0,
                     strict=True, maximum=1.0)


@register(
    "random_labels", config=RandomLabelsConfig, tasks=("classification", "regression"),
    reference="Graves et al., Amnesiac Machine Learning, AAAI 2021",
)
def random_labels(model, data, config: RandomLabelsConfig, device, seed):
    """Fine-tune on the forget set with wrong random labels, with the retain set mixed in."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA11]))
    if data.forget.task == "regression":
        wrong = shifted_targets(data.forget.labels, config.shift_min, config.shift_max, rng)
    else:
        wrong = random_wrong_labels(data.forget.labels, data.forget.n_classes, rng)
    retain = data.retain
    if config.retain_fraction < 1:
        keep = rng.choice(len(retain), size=max(1, int(config.retain_fraction * len(retain))),
                          replace=False)
        retain = retain.take(np.sort(keep))
    x, y, r = stack((data.forget, wrong, FORGET), (retain, RETAIN))
    return train(model, x, y, r, cross_entropy, config, device, seed)
