"""Twin Machine Unlearning (Ji, Niu et al., "Towards Aligned Data Removal via Twin Machine
Unlearning", arXiv 2408.11433, 2024; code ``abc321123444/TWIN-unlearning``).

The gold model (retrained without the forget set) still classifies some forget samples correctly
(*easy*: the rest of the data generalises to them) and others not (*hard*). Twin MU learns to
tell the two apart on a *twin* problem whose answer is known, then unlearns only the hard part.

From the paper:

1. the twin problem: the original model, fine-tuned on its training set plus held-out ``extra``
   samples, is the twin model; those extra samples are the twin forget set, and the original
   model (which never saw them) is the twin problem's gold model;
2. generalization labels of the twin forget set: *easy* where the original model classifies a
   sample correctly, *hard* where it does not;
3. three features per sample, DF (distance), AF (adversarial attack) and CF (curriculum loss);
   a binary classifier learns easy/hard from the twin features (under the twin model) and
   predicts it for the real forget set (features under the original model);
4. unlearning keeps the easy forget samples and forgets the hard ones, so accuracy falls on the
   hard part only.

Where the paper is silent, the code decides (file names from the repository):

- *twin forget set*: the code draws it from data held out of training (``get_left``); here from
  ``extra`` (same class for subclass requests), sized to keep the forget ratio: its share of the
  twin model's training data equals the forget set's share of the original training data,
  ``k = round(m * n / (n - m))`` for ``m`` forget samples out of ``n``. When ``extra`` holds
  fewer, all of it is used and the twin model fine-tunes on a random part of the training set
  sized so that the ratio still holds (:func:`twin_problem`);
- *twin model*: fine-tuned from the original, Adam lr 1e-4, batch 64, 10 epochs
  (``train_test_data.py``);
- *curriculum model* (CF): trained from scratch for 2 epochs, Adam lr 1e-4, batch 64, on the
  original training set only (``train_loss.py`` trains on ``dataset``, not on the held-out data);
  the same model scores the twin and the real forget set;
- *DF*: mean L2 distance of the L2-normalised penultimate features to the 5 nearest retained
  samples of the same class; the retained samples are embedded under the twin model for both
  problems (``preds_R = get_feature(netC, dataset_t_nf)``);
- *AF*: untargeted PGD from the clean input, 5 steps of ``eps / 3`` along the sign of the
  cross-entropy gradient, eps 4/255 (``eval_adverarial_attack`` overrides the eps it is given),
  projected to the L-inf ball; the feature is ``cross_entropy(z_adv, z_clean)`` with the clean
  *logits* as the soft target, i.e. ``-sum_c z_clean_c * log_softmax(z_adv)_c``;
- *scaling*: each feature is clipped at 1.5 IQR beyond its quartiles and min-max scaled, fitted
  separately on the twin features and on the real features (``outline`` and the min-max lines,
  applied to each set on its own; a constant feature scales to 0 instead of the code's NaN);
- *features used*: DF and CF by default (``feature_con = stack((d1_con, d3_con))``; the AF stack
  is commented out); ``features`` chooses;
- *classifier*: ``pure_model``, an MLP 32-16 with one output, sigmoid and BCE, Adam lr 0.01,
  batch 128, 200 epochs (``trainb``); easy = 1, and a sample is easy when the output is > 0.5
  (``evalb``). When every twin sample has the same label the classifier is skipped and that
  label given to every real sample (nothing to learn);
- *unlearning*: the hard forget samples get a random label other than their own
  (``Custom_dataset.randomlabel``), the easy ones keep theirs, and the model fine-tunes on them
  with the retain set: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 64, 5 epochs. The
  code's ``noise_train`` (module ``un``) is not in the public repository, so its noise term is
  not reproduced. The code fine-tunes the twin model here; this module unlearns the original
  model, the twin serving only to train the classifier (the original problem of the paper).
"""

from __future__ import annotations

import copy
import time
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
EASY, HARD = 1, 0


@dataclass(frozen=True, kw_only=True)
class TwinMUConfig(LoopConfig):
    """Defaults of the authors' code (see the module docstring for where each comes from)."""

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
    classifier_batch_size: int = 128
    features: tuple[str, ...] = ("distance", "curriculum")

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = sorted(set(self.features) - set(FEATURES))
        if bad or not self.features or len(set(self.features)) != len(self.features):
            raise ValueError(f"The 'features' parameter of TwinMUConfig must be a non-empty subset "
                             f"of {list(FEATURES)} without repeats. Got {list(self.features)!r} "
                             "instead.")
        for name in ("twin_epochs", "curriculum_epochs", "attack_steps", "neighbours",
                     "classifier_epochs", "classifier_batch_size"):
            check_int("TwinMUConfig", name, getattr(self, name), 1)
        for name in ("twin_lr", "curriculum_lr", "classifier_lr"):
            check_number("TwinMUConfig", name, getattr(self, name), 0.0, strict=True)
        check_number("TwinMUConfig", "attack_eps", self.attack_eps, 0.0)


def _tensor(samples: SampleSet, device) -> torch.Tensor:
    return torch.from_numpy(np.array(samples.features, dtype=np.float32)).to(device)


def _labels(samples: SampleSet, device) -> torch.Tensor:
    return torch.from_numpy(np.array(samples.labels, dtype=np.int64)).to(device)


def twin_problem(
    full: SampleSet, forget: SampleSet, extra: SampleSet, request, rng: np.random.Generator
) -> tuple[SampleSet, SampleSet]:
    """The twin model's training set (part or all of ``full``) and the twin forget set (from
    ``extra``), with ``len(twin_forget) / (len(twin_train) + len(twin_forget))`` equal to
    ``len(forget) / len(full)`` up to rounding."""
    pool = extra
    if request.kind == "subclass":
        pool = extra.take(extra.labels == request.label)
    if len(pool) < 2:
        raise ValueError("Twin MU needs at least 2 'extra' samples for its twin forget set"
                         + (f" of class {request.label}" if request.kind == "subclass" else "")
                         + f"; got {len(pool)}. Pass more held-out labelled data as "
                         "UnlearningData(extra=...).")
    n, m = len(full), len(forget)
    wanted = max(1, round(m * n / (n - m))) if n > m else len(pool)
    k = min(wanted, len(pool))
    twin_forget = pool.take(np.sort(rng.choice(len(pool), k, replace=False)))
    if k == wanted:
        return full, twin_forget
    keep = min(n, max(1, round(k * (n - m) / m)))
    return full.take(np.sort(rng.choice(n, keep, replace=False))), twin_forget


def generalization_labels(model: nn.Module, samples: SampleSet, device) -> np.ndarray:
    """EASY (1) where ``model`` classifies a sample correctly, HARD (0) where it does not."""
    model.eval()
    with torch.no_grad():
        pred = model(_tensor(samples, device)).argmax(1).cpu().numpy()
    return np.where(pred == samples.labels, EASY, HARD).astype(np.int64)


def _embed(model: nn.Module, samples: SampleSet, device) -> torch.Tensor:
    if not hasattr(model, "features"):
        raise ValueError("Twin MU needs a model with a features() method (penultimate layer); "
                         "the sisa_ray model zoo's models have one.")
    model.eval()
    with torch.no_grad():
        return nn.functional.normalize(model.features(_tensor(samples, device)).flatten(1), dim=1)


def distance_feature(
    model: nn.Module, samples: SampleSet, pool_model: nn.Module, pool: SampleSet, k: int, device
) -> np.ndarray:
    """DF: mean distance from each sample (embedded by ``model``) to its ``k`` nearest samples of
    the same class in ``pool`` (embedded by ``pool_model``), on L2-normalised features."""
    e, ref = _embed(model, samples, device), _embed(pool_model, pool, device)
    out = np.zeros(len(samples))
    for c in np.unique(samples.labels):
        rows = np.flatnonzero(samples.labels == c)
        same = ref[torch.from_numpy(pool.labels == c).to(ref.device)]
        if len(same) == 0:
            out[rows] = 2.0  # the largest distance between unit vectors
            continue
        d = torch.cdist(e[torch.from_numpy(rows).to(e.device)], same)
        out[rows] = d.topk(min(k, same.shape[0]), largest=False).values.mean(1).cpu().numpy()
    return out


def adversarial_feature(model: nn.Module, samples: SampleSet, eps: float, steps: int,
                        device) -> np.ndarray:
    """AF: ``-sum_c z_clean_c * log_softmax(z_adv)_c``, the reference's cross-entropy of the PGD
    example's outputs against the clean *logits* used as a soft target."""
    model.eval()
    x, y = _tensor(samples, device), _labels(samples, device)
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(adv), y)
        (g,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = torch.max(torch.min(adv + eps / 3 * g.sign(), x + eps), x - eps)
    with torch.no_grad():
        clean = model(x)
        return (-(clean * torch.log_softmax(model(adv), dim=1)).sum(1)).cpu().numpy()


def curriculum_feature(curriculum: nn.Module, samples: SampleSet, device) -> np.ndarray:
    """CF: each sample's cross-entropy under the briefly trained curriculum model."""
    curriculum.eval()
    with torch.no_grad():
        out = curriculum(_tensor(samples, device))
        return nn.functional.cross_entropy(out, _labels(samples, device),
                                           reduction="none").cpu().numpy()


def scale_features(f: np.ndarray) -> np.ndarray:
    """Per column: clip at 1.5 IQR beyond the quartiles, then min-max scale, on this array's own
    statistics (the reference scales the twin and the real features each on its own)."""
    q1, q3 = np.percentile(f, 25, axis=0), np.percentile(f, 75, axis=0)
    c = np.clip(f, q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1))
    lo, span = c.min(0), c.max(0) - c.min(0)
    return np.where(span > 0, (c - lo) / np.where(span > 0, span, 1.0), 0.0)


def features_of(model, pool_model, curriculum, samples, pool, config: TwinMUConfig,
                device) -> np.ndarray:
    """The configured feature columns of ``samples`` under ``model``, unscaled."""
    cols = []
    for name in config.features:
        if name == "distance":
            cols.append(distance_feature(model, samples, pool_model, pool, config.neighbours,
                                         device))
        elif name == "adversarial":
            cols.append(adversarial_feature(model, samples, config.attack_eps,
                                            config.attack_steps, device))
        else:
            cols.append(curriculum_feature(curriculum, samples, device))
    return np.stack(cols, axis=1)


def train_classifier(f: np.ndarray, easy: np.ndarray, config: TwinMUConfig, seed: int) -> nn.Module:
    """The reference's ``pure_model``: MLP 32-16, one output through a sigmoid, BCE, Adam."""
    clf = nn.Sequential(nn.Linear(f.shape[1], 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                        nn.Linear(16, 1))
    x = torch.from_numpy(f.astype(np.float32))
    y = torch.from_numpy(easy.astype(np.float32))
    opt = torch.optim.Adam(clf.parameters(), lr=config.classifier_lr)
    gen = torch.Generator().manual_seed(seed)
    bs = config.classifier_batch_size
    for _ in range(config.classifier_epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), bs):
            idx = perm[s:s + bs]
            opt.zero_grad()
            p = torch.sigmoid(clf(x[idx]).squeeze(1))
            nn.functional.binary_cross_entropy(p, y[idx]).backward()
            opt.step()
    return clf.eval()


def predict_easy(clf: nn.Module, f: np.ndarray) -> np.ndarray:
    """EASY where the classifier's sigmoid output is > 0.5, else HARD (``evalb``)."""
    with torch.no_grad():
        p = torch.sigmoid(clf(torch.from_numpy(f.astype(np.float32))).squeeze(1)).numpy()
    return np.where(p > 0.5, EASY, HARD).astype(np.int64)


def unlearning_labels(labels: np.ndarray, easy: np.ndarray, n_classes: int,
                      rng: np.random.Generator) -> np.ndarray:
    """The forget set's training labels: the hard samples get a random other label, the easy ones
    keep their own."""
    out = np.array(labels, copy=True)
    hard = np.flatnonzero(easy == HARD)
    out[hard] = random_wrong_labels(out[hard], n_classes, rng)
    return out


@register(
    "twin_mu", config=TwinMUConfig, kinds=("random", "subclass"),
    needs=("forget", "retain", "extra"),
    reference="Ji et al., Twin Machine Unlearning, arXiv 2408.11433, 2024 "
              "(code: abc321123444/TWIN-unlearning)",
)
def twin_mu(model, data, config: TwinMUConfig, device, seed):
    """Predict which forget samples the gold model would get wrong, and unlearn only those."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7717]))
    original = copy.deepcopy(model).eval()
    full = data.full()
    twin_train, twin_forget = twin_problem(full, data.forget, data.extra, data.request, rng)
    twin = copy.deepcopy(model)
    adam = dict(optimizer="adam", weight_decay=0.0, batch_size=64)
    x, y, r = stack((twin_train, RETAIN), (twin_forget, FORGET))
    train(twin, x, y, r, cross_entropy,
          LoopConfig(epochs=config.twin_epochs, lr=config.twin_lr, **adam), device, seed + 1)
    curriculum = reinitialised(model)
    x, y, r = stack((full, RETAIN))
    train(curriculum, x, y, r, cross_entropy,
          LoopConfig(epochs=config.curriculum_epochs, lr=config.curriculum_lr, **adam), device,
          seed + 2)
    timings["twin_models"] = time.perf_counter() - t0
    easy_twin = generalization_labels(original, twin_forget, device)
    if easy_twin.min() == easy_twin.max():
        easy_real = np.full(len(data.forget), easy_twin[0])  # one class only: nothing to learn
    else:
        f_twin = features_of(twin, twin, curriculum, twin_forget, data.retain, config, device)
        clf = train_classifier(scale_features(f_twin), easy_twin, config, seed + 3)
        f_real = features_of(original, twin, curriculum, data.forget, data.retain, config, device)
        easy_real = predict_easy(clf, scale_features(f_real))
    timings["classifier"] = time.perf_counter() - t0 - timings["twin_models"]
    timings["hard_fraction"] = float(np.mean(easy_real == HARD))
    labels = unlearning_labels(data.forget.labels, easy_real, data.forget.n_classes, rng)
    x, y, r = stack((data.retain, RETAIN), (data.forget, labels, FORGET))
    train(model, x, y, r, cross_entropy, config, device, seed)
    return model, timings
