"""Bad teaching (Chundawat, Tarun, Mandal and Kankanhalli, "Can Bad Teaching Induce Forgetting?
Unlearning in Deep Networks using an Incompetent Teacher", AAAI 2023)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sisa_ray.core.config import check_number

from ..base import register
from ..loop import FORGET, RETAIN, LoopConfig, stack, train


@dataclass(frozen=True, kw_only=True)
class BadTeacherConfig(LoopConfig):
    """Authors' defaults (``blindspot`` in Foster et al.'s SSD code, which carries the original
    implementation of github.com/vikram2000b/bad-teaching-unlearning): KL temperature 1, 1 epoch,
    Adam lr 1e-4, batch 256, ``int(0.3 * len(retain))`` retain samples drawn at random."""

    epochs: int = 1
    lr: float = 1e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    batch_size: int = 256
    temperature: float = 1.0
    retain_fraction: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("BadTeacherConfig", "temperature", self.temperature, 0.0, strict=True)
        check_number("BadTeacherConfig", "retain_fraction", self.retain_fraction, 0.0,
                     strict=True, maximum=1.0)


def reinitialised(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with freshly initialised weights (drawn from the seeded global RNG)."""
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return fresh


def bad_teacher_kl(log_student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.kl_div(log_student, target)`` with the element-wise mean reduction the reference uses,
    written as sum / numel because PyTorch warns on ``reduction="mean"``."""
    return nn.functional.kl_div(log_student, target, reduction="sum") / target.numel()


@register(
    "bad_teacher", config=BadTeacherConfig,
    reference="Chundawat et al., Can Bad Teaching Induce Forgetting?, AAAI 2023",
)
def bad_teacher(model, data, config: BadTeacherConfig, device, seed):
    """Distil the original model on retain samples and a randomly initialised (incompetent)
    teacher on forget samples.

    The loss is the reference's ``UnlearnerLoss``: ``F.kl_div(log_softmax(student / T), target)``
    with PyTorch's default element-wise ``mean`` reduction (the sum over the batch and the classes
    divided by ``batch * classes``), the target being the incompetent teacher's
    ``softmax(logits / T)`` on forget samples and the original model's on retain samples. The
    incompetent teacher is a copy of the model re-initialised from the seeded RNG.
    """
    competent = copy.deepcopy(model).eval()
    incompetent = reinitialised(model).eval()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBAD]))
    n_keep = max(1, int(config.retain_fraction * len(data.retain)))
    retain = data.retain.take(np.sort(rng.choice(len(data.retain), n_keep, replace=False)))
    x, y, r = stack((data.forget, FORGET), (retain, RETAIN))
    t = config.temperature

    def loss(m, xb, yb, rb):
        with torch.no_grad():
            good = torch.softmax(competent(xb) / t, dim=1)
            bad = torch.softmax(incompetent(xb) / t, dim=1)
            target = torch.where((rb == FORGET)[:, None], bad, good)
        log_student = torch.log_softmax(m(xb) / t, dim=1)
        return bad_teacher_kl(log_student, target)

    return train(model, x, y, r, loss, config, device, seed)
