"""Unlearning as adversarial regularisation: make the forget set's outputs indistinguishable from
the retain set's, while distilling the original model on the retain set.

A small discriminator (MLP on softmax outputs) learns to tell the model's outputs on forget samples
from those on retain samples; the model is trained to fool it (its forget outputs should look like
retain outputs to the discriminator, i.e. like unseen data to a membership attacker) plus a KL
distillation term towards the original model on the retain set. Each mini-batch mixes both sets;
one discriminator step precedes each model step. In the spirit of adversarial membership-privacy
training (Nasr, Shokri and Houmansadr, "Machine Learning with Membership Privacy using Adversarial
Regularization", CCS 2018), applied to unlearning; the defaults are this project's (Adam, lr 1e-3,
3 epochs, discriminator lr 1e-3, adversarial weight 1).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from sisa_ray.core.config import check_int, check_number

from ..base import register
from ..loop import FORGET, RETAIN, LoopConfig, stack, train


@dataclass(frozen=True, kw_only=True)
class AdversarialConfig(LoopConfig):
    epochs: int = 3
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    batch_size: int = 64
    disc_lr: float = 1e-3
    disc_hidden: int = 64
    adv_weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("disc_lr", "adv_weight", "temperature"):
            check_number("AdversarialConfig", name, getattr(self, name), 0.0, strict=True)
        check_int("AdversarialConfig", "disc_hidden", self.disc_hidden, 1)


@register(
    "adversarial", config=AdversarialConfig,
    reference="adversarial regularisation (Nasr et al., CCS 2018) applied to unlearning",
)
def adversarial(model, data, config: AdversarialConfig, device, seed):
    original = copy.deepcopy(model).eval()
    n_classes = data.forget.n_classes
    disc = nn.Sequential(nn.Linear(n_classes, config.disc_hidden), nn.ReLU(),
                         nn.Linear(config.disc_hidden, 1)).to(device)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=config.disc_lr)
    x, y, r = stack((data.forget, FORGET), (data.retain, RETAIN))
    t = config.temperature
    bce = nn.functional.binary_cross_entropy_with_logits

    def loss(m, xb, yb, rb):
        is_forget = (rb == FORGET).float()
        out = m(xb)
        probs = torch.softmax(out / t, dim=1)
        # discriminator step on detached outputs: forget = 1, retain = 0
        disc_opt.zero_grad(set_to_none=True)
        bce(disc(probs.detach()).squeeze(1), is_forget).backward()
        disc_opt.step()
        # model step: fool the discriminator on forget samples, distil on retain samples
        total = torch.zeros((), device=xb.device)
        f_mask, r_mask = rb == FORGET, rb == RETAIN
        if f_mask.any():
            fooled = bce(disc(probs[f_mask]).squeeze(1), torch.zeros(int(f_mask.sum()),
                                                                     device=xb.device))
            total = total + config.adv_weight * fooled
        if r_mask.any():
            with torch.no_grad():
                target = torch.softmax(original(xb[r_mask]) / t, dim=1)
            total = total + nn.functional.kl_div(torch.log_softmax(out[r_mask] / t, dim=1),
                                                 target, reduction="batchmean")
        return total

    return train(model, x, y, r, loss, config, device, seed)
