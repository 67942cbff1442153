"""Twin Machine Unlearning (Ji, Zhang et al., "Twin Machine Unlearning", arXiv 2408.11433, 2024).

The gold model (retrained without the forget set) would still classify some forget samples
correctly (*easy*: the rest of the data generalises to them) and others not (*hard*: only
memorisation got them right). Twin MU learns to tell the two apart on a *twin* problem whose
answer is known, then unlearns only the hard part:

1. twin model: the original fine-tuned on the training set plus held-out ``extra`` samples; a
   twin forget set of those extra samples (as many as the real forget set, same class for subclass
   requests), whose gold is the original model (it never saw them);
2. easy/hard labels of the twin forget set: whether the original model classifies them correctly;
3. three features of a sample under a model: DF, the mean L2 distance of its normalised
   penultimate features to its 5 nearest retained same-class samples; AF, the cross-entropy
   between the model's outputs on a PGD-adversarial version and on the clean input; CF, its loss
   under a "curriculum" model trained from scratch for 2 epochs. Each is clipped at 1.5 IQR and
   min-max scaled (bounds from the twin problem);
4. a binary classifier (MLP 64-32) learns easy/hard from the twin features and predicts it for the
   real forget set (features under the original model);
5. unlearning: fine-tune on the retain set plus the forget set, hard samples relabelled at
   random, easy samples with their true labels: accuracy falls on the hard part only.

Defaults follow the authors' code (``abc321123444/TWIN-unlearning``): twin fine-tune 10 epochs,
Adam 1e-4, batch 64; PGD 5 steps, eps 4/255, step eps/3; curriculum 2 epochs, Adam 1e-4; classifier
Adam 0.01, 200 epochs, batch 128; unlearning SGD 0.01, momentum 0.9, weight decay 5e-4, 5 epochs.
The authors' default feeds only DF and CF to the classifier; ``features`` selects which are used.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sisa_ray.core.config import check_int, check_number
from sisa_ray.core.data import SampleSet

from ..base import register
from ..loop import FORGET, RETAIN, LoopConfig, cross_entropy, stack, train
from .bad_teacher import reinitialised
from .random_labels import random_wrong_labels

FEATURES = ("distance", "adversarial", "curriculum")


@dataclass(frozen=True, kw_only=True)
class TwinMUConfig(LoopConfig):
    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 64
    twin_epochs: int = 10
    twin_lr: float = 1e-4
    curriculum_epochs: int = 2
    curriculum_lr: float = 1e-4
    attack_eps: float = 4 / 255
    attack_steps: int = 5
    neighbours: int = 5
    classifier_epochs: int = 200
    classifier_lr: float = 0.01
    features: tuple[str, ...] = FEATURES

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = sorted(set(self.features) - set(FEATURES))
        if bad or not self.features:
            raise ValueError(f"The 'features' parameter of TwinMUConfig must be a non-empty subset "
                             f"of {list(FEATURES)}. Got {list(self.features)!r} instead.")
        for name in ("twin_epochs", "curriculum_epochs", "attack_steps", "neighbours",
                     "classifier_epochs"):
            check_int("TwinMUConfig", name, getattr(self, name), 1)
        for name in ("twin_lr", "curriculum_lr", "classifier_lr"):
            check_number("TwinMUConfig", name, getattr(self, name), 0.0, strict=True)
        check_number("TwinMUConfig", "attack_eps", self.attack_eps, 0.0)


def _embed(model: nn.Module, data: SampleSet, device) -> torch.Tensor:
    if not hasattr(model, "features"):
        raise ValueError("Twin MU needs a model with a features() method (penultimate layer); "
                         "the sisa_ray model zoo's models have one.")
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.array(data.features, dtype=np.float32)).to(device)
        return nn.functional.normalize(model.features(x).flatten(1), dim=1)


def distance_feature(model, samples: SampleSet, reference: SampleSet, k: int, device) -> np.ndarray:
    """Mean distance to the ``k`` nearest reference samples of the same class (embedding space)."""
    e, ref = _embed(model, samples, device), _embed(model, reference, device)
    out = np.zeros(len(samples))
    for c in np.unique(samples.labels):
        rows = np.flatnonzero(samples.labels == c)
        pool = ref[torch.from_numpy(reference.labels == c)]
        if len(pool) == 0:
            out[rows] = 2.0  # the largest distance between unit vectors
            continue
        d = torch.cdist(e[torch.from_numpy(rows)], pool)
        out[rows] = d.topk(min(k, pool.shape[0]), largest=False).values.mean(1).cpu().numpy()
    return out


def adversarial_feature(model, samples: SampleSet, eps: float, steps: int, device) -> np.ndarray:
    """Cross-entropy between outputs on an untargeted PGD example and on the clean input."""
    model.eval()
    x = torch.from_numpy(np.array(samples.features, dtype=np.float32)).to(device)
    y = torch.from_numpy(np.array(samples.labels, dtype=np.int64)).to(device)
    with torch.no_grad():
        clean = torch.softmax(model(x), dim=1)
    delta = torch.zeros_like(x, requires_grad=True)
    step = eps / 3
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x + delta), y)
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += step * g.sign()
            delta.clamp_(-eps, eps)
    with torch.no_grad():
        adv = torch.log_softmax(model(x + delta), dim=1)
        return (-(clean * adv).sum(1)).cpu().numpy()


def curriculum_feature(curriculum: nn.Module, samples: SampleSet, device) -> np.ndarray:
    curriculum.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.array(samples.features, dtype=np.float32)).to(device)
        y = torch.from_numpy(np.array(samples.labels, dtype=np.int64)).to(device)
        return nn.functional.cross_entropy(curriculum(x), y, reduction="none").cpu().numpy()


def features_of(model, curriculum, samples, reference, config: TwinMUConfig, device) -> np.ndarray:
    cols = []
    for name in config.features:
        if name == "distance":
            cols.append(distance_feature(model, samples, reference, config.neighbours, device))
        elif name == "adversarial":
            cols.append(adversarial_feature(model, samples, config.attack_eps,
                                            config.attack_steps, device))
        else:
            cols.append(curriculum_feature(curriculum, samples, device))
    return np.stack(cols, axis=1)


class _Scaler:
    """Clip at 1.5 IQR beyond the quartiles, then min-max scale; fitted on the twin features."""

    def fit(self, f: np.ndarray) -> _Scaler:
        q1, q3 = np.percentile(f, 25, axis=0), np.percentile(f, 75, axis=0)
        self.lo, self.hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
        c = np.clip(f, self.lo, self.hi)
        self.min, self.span = c.min(0), np.maximum(c.max(0) - c.min(0), 1e-12)
        return self

    def transform(self, f: np.ndarray) -> np.ndarray:
        return (np.clip(f, self.lo, self.hi) - self.min) / self.span


def train_classifier(f: np.ndarray, hard: np.ndarray, config: TwinMUConfig, seed: int) -> nn.Module:
    """MLP 64-32 with a sigmoid output, BCE, Adam; 1 = hard."""
    clf = nn.Sequential(nn.Linear(f.shape[1], 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                        nn.Linear(32, 1))
    x = torch.from_numpy(f.astype(np.float32))
    y = torch.from_numpy(hard.astype(np.float32))
    opt = torch.optim.Adam(clf.parameters(), lr=config.classifier_lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(config.classifier_epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), 128):
            idx = perm[s:s + 128]
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(clf(x[idx]).squeeze(1), y[idx]).backward()
            opt.step()
    return clf.eval()


def _twin_forget(extra: SampleSet, forget: SampleSet, request, rng) -> SampleSet:
    pool = extra
    if request.kind == "subclass":
        pool = extra.take(extra.labels == request.label)
    if len(pool) < 2:
        raise ValueError("Twin MU needs at least 2 'extra' samples for its twin forget set"
                         + (f" of class {request.label}" if request.kind == "subclass" else "")
                         + "; pass more held-out labelled data as UnlearningData(extra=...).")
    n = min(len(forget), len(pool))
    return pool.take(np.sort(rng.choice(len(pool), n, replace=False)))


@register(
    "twin_mu", config=TwinMUConfig, kinds=("random", "subclass"),
    needs=("forget", "retain", "extra"),
    reference="Ji et al., Twin Machine Unlearning, arXiv 2408.11433, 2024",
)
def twin_mu(model, data, config: TwinMUConfig, device, seed):
    timings: dict[str, float] = {}
    import time

    t0 = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7717]))
    original = copy.deepcopy(model).eval()
    full = data.full()
    twin_forget = _twin_forget(data.extra, data.forget, data.request, rng)
    # 1. the twin model has trained on the twin forget set; the original is its gold
    twin = copy.deepcopy(model)
    tcfg = LoopConfig(epochs=config.twin_epochs, lr=config.twin_lr, optimizer="adam",
                      weight_decay=0.0, batch_size=64)
    x, y, r = stack((full, RETAIN), (twin_forget, FORGET))
    train(twin, x, y, r, cross_entropy, tcfg, device, seed + 1)
    # the curriculum model: trained from scratch briefly, on everything either problem saw
    curriculum = reinitialised(model)
    ccfg = LoopConfig(epochs=config.curriculum_epochs, lr=config.curriculum_lr, optimizer="adam",
                      weight_decay=0.0, batch_size=64)
    train(curriculum, x, y, r, cross_entropy, ccfg, device, seed + 2)
    timings["twin_models"] = time.perf_counter() - t0
    # 2. easy (0) / hard (1) labels of the twin problem
    with torch.no_grad():
        xf = torch.from_numpy(np.array(twin_forget.features, dtype=np.float32)).to(device)
        hard_twin = (original(xf).argmax(1).cpu().numpy() != twin_forget.labels).astype(np.int64)
    # 3-4. features and the easy/hard classifier
    f_twin = features_of(twin, curriculum, twin_forget, data.retain, config, device)
    scaler = _Scaler().fit(f_twin)
    if hard_twin.min() == hard_twin.max():
        hard_real = np.full(len(data.forget), hard_twin[0])  # one class only: nothing to learn
    else:
        clf = train_classifier(scaler.transform(f_twin), hard_twin, config, seed + 3)
        f_real = features_of(original, curriculum, data.forget, data.retain, config, device)
        with torch.no_grad():
            logit = clf(torch.from_numpy(scaler.transform(f_real).astype(np.float32)))
        hard_real = (logit.squeeze(1).numpy() > 0).astype(np.int64)
    timings["classifier"] = time.perf_counter() - t0 - timings["twin_models"]
    timings["hard_fraction"] = float(hard_real.mean())
    # 5. unlearn the hard part only
    labels = data.forget.labels.copy()
    hard_rows = np.flatnonzero(hard_real == 1)
    labels[hard_rows] = random_wrong_labels(labels[hard_rows], data.forget.n_classes, rng)
    x, y, r = stack((data.retain, RETAIN), (data.forget, labels, FORGET))
    train(model, x, y, r, cross_entropy, config, device, seed)
    return model, timings
