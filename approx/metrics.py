"""Unlearning metrics: how close an unlearned model is to the gold model (retrained without the
forget set), and how well an attacker can still tell the forget set apart.

* accuracy on retain / forget / test sets and each one's gap to the gold model;
* a membership inference attack (MIA): logistic regression on per-sample losses, forget vs test,
  balanced, cross-validated accuracy (0.5 = the attacker cannot tell);
* activation distance: mean L2 distance between two models' softmax outputs;
* Jensen-Shannon divergence between two models' softmax outputs;
* the NeurIPS 2023 Machine Unlearning challenge's forgetting quality F and its final score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from sisa_ray.core.data import SampleSet


@torch.no_grad()
def logits(model: nn.Module, data: SampleSet, device: str | torch.device = "cpu",
           batch_size: int = 1024) -> np.ndarray:
    model.eval()
    x = torch.from_numpy(np.array(data.features, dtype=np.float32))
    outs = [model(x[i:i + batch_size].to(device)).double().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, data.n_classes))


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(model: nn.Module, data: SampleSet | None, device="cpu") -> float:
    if data is None or len(data) == 0:
        return float("nan")
    return float((logits(model, data, device).argmax(1) == data.labels).mean())


def per_sample_loss(model: nn.Module, data: SampleSet, device="cpu") -> np.ndarray:
    """Cross-entropy per sample; squared error for regression."""
    if data.task == "regression":
        return (logits(model, data, device)[:, 0] - data.labels) ** 2
    z = torch.from_numpy(logits(model, data, device))
    y = torch.from_numpy(np.array(data.labels, dtype=np.int64))
    return nn.functional.cross_entropy(z, y, reduction="none").numpy()


def mia_accuracy(forget_losses: np.ndarray, test_losses: np.ndarray, seed: int = 0,
                 folds: int = 5) -> float:
    """Balanced, cross-validated accuracy of a logistic regression telling forget-set losses
    (members) from test-set losses (non-members). 0.5 means the attack cannot tell them apart."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    forget_losses = np.asarray(forget_losses, dtype=np.float64)
    test_losses = np.asarray(test_losses, dtype=np.float64)
    n = min(len(forget_losses), len(test_losses))
    if n < folds:
        raise ValueError(f"MIA needs at least {folds} forget and {folds} test samples; got "
                         f"{len(forget_losses)} and {len(test_losses)}.")
    rng = np.random.default_rng(seed)
    f = rng.choice(forget_losses, n, replace=False)
    t = rng.choice(test_losses, n, replace=False)
    x = np.concatenate([f, t])[:, None]
    y = np.concatenate([np.ones(n), np.zeros(n)])
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy").mean())


def activation_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Mean L2 distance between rows of two probability matrices."""
    return float(np.linalg.norm(np.asarray(p) - np.asarray(q), axis=1).mean())


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Mean Jensen-Shannon divergence (natural log) between rows of two probability matrices."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    m = 0.5 * (p + q)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(a > 0, a * np.log(a / b), 0.0)
        return t.sum(axis=1)

    return float((0.5 * kl(p, m) + 0.5 * kl(q, m)).mean())


# -- NeurIPS 2023 unlearning challenge -------------------------------------------------------------


def logit_margin(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """True-class logit minus the largest other logit, per sample."""
    z = np.asarray(z, dtype=np.float64)
    idx = np.arange(len(labels))
    true = z[idx, labels]
    other = z.copy()
    other[idx, labels] = -np.inf
    return true - other.max(axis=1)


def _attack_epsilon(fpr: float, fnr: float, delta: float) -> float:
    """Epsilon of one attack, as the challenge's ``compute_epsilon_s``: both error rates zero is
    a perfect attack (infinity); exactly one zero gives no estimate (the attack is discarded)."""
    if fpr == 0 and fnr == 0:
        return math.inf
    if fpr == 0 or fnr == 0:
        return math.nan
    terms = [math.log(1 - delta - a) - math.log(b)
             for a, b in ((fpr, fnr), (fnr, fpr)) if 1 - delta - a > 0]
    return max(terms) if terms else math.nan


def example_epsilon(unlearned: np.ndarray, retrained: np.ndarray, delta: float = 1e-5) -> float:
    """Privacy epsilon of one example from threshold attacks on two 1-D samples of a statistic
    (e.g. the example's logit margin under several unlearned and several retrained models).

    Every threshold, in both directions ("unlearned if value > t" and "if value <= t"), is an
    attack with a false positive rate (retrained flagged as unlearned) and a false negative rate;
    each gives ``max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR))``. Epsilon is the
    largest over attacks, never below 0.
    """
    u = np.sort(np.asarray(unlearned, dtype=np.float64))
    r = np.sort(np.asarray(retrained, dtype=np.float64))
    best = 0.0
    for t in np.concatenate([[-np.inf], np.unique(np.concatenate([u, r]))]):
        u_le = np.searchsorted(u, t, side="right") / len(u)
        r_le = np.searchsorted(r, t, side="right") / len(r)
        for fpr, fnr in ((1 - r_le, u_le), (r_le, 1 - u_le)):
            eps = _attack_epsilon(fpr, fnr, delta)
            if eps == eps:  # not NaN
                best = max(best, eps)
    return best


def forgetting_quality(unlearned_margins: np.ndarray, retrained_margins: np.ndarray,
                       delta: float = 1e-5, bin_width: float = 0.5) -> float:
    """The challenge's forgetting quality F.

    ``*_margins`` have shape (n_models, n_forget_examples). Each example's epsilon falls in bin
    ``k = floor(eps / bin_width) + 1`` and scores ``2 ** (1 - k)`` (1 for eps < 0.5, 0.5 for eps in
    [0.5, 1), ..., 0 for infinite epsilon); F is the mean score over examples.
    """
    u = np.asarray(unlearned_margins, dtype=np.float64)
    r = np.asarray(retrained_margins, dtype=np.float64)
    if u.ndim != 2 or r.ndim != 2 or u.shape[1] != r.shape[1]:
        raise ValueError(f"Margins must be (n_models, n_examples) with equal n_examples. Got "
                         f"{u.shape} and {r.shape}.")
    scores = []
    for j in range(u.shape[1]):
        eps = example_epsilon(u[:, j], r[:, j], delta)
        scores.append(0.0 if math.isinf(eps) else 2.0 ** (1 - (math.floor(eps / bin_width) + 1)))
    return float(np.mean(scores))


def challenge_score(f: float, retain_acc: float, retain_acc_gold: float, test_acc: float,
                    test_acc_gold: float) -> float:
    """Final score ``F * RA/RA_gold * TA/TA_gold``."""
    return float(f * (retain_acc / retain_acc_gold) * (test_acc / test_acc_gold))


# -- regression (age estimation and the like) ------------------------------------------------------


@torch.no_grad()
def predictions(model: nn.Module, data: SampleSet, device="cpu") -> np.ndarray:
    """A regression model's single output per sample."""
    return logits(model, data, device)[:, 0]


def mae(model: nn.Module, data: SampleSet, device="cpu") -> float:
    return float(np.abs(predictions(model, data, device) - data.labels).mean())


def utility_score(mae_gold_test: float, mae_model_test: float) -> float:
    """``MAE_gold / MAE_model`` on the test set (1 = as good as the gold model)."""
    return float(mae_gold_test / mae_model_test)


def forgetting_score(err_gold: np.ndarray, err_model: np.ndarray, alpha: float = 15.0) -> float:
    """Mean over forget samples of ``exp(-|err_gold - err_model| / alpha)``, where ``err`` are the
    models' absolute errors on each forget sample (1 = errs exactly like the gold model)."""
    diff = np.abs(np.asarray(err_gold, np.float64) - np.asarray(err_model, np.float64))
    return float(np.exp(-diff / alpha).mean())


def regression_scores(model: nn.Module, gold: nn.Module, forget: SampleSet, test: SampleSet,
                      alpha: float = 15.0, device="cpu") -> dict[str, float]:
    """Utility, forgetting and their product (the combined score)."""
    u = utility_score(mae(gold, test, device), mae(model, test, device))
    f = forgetting_score(np.abs(predictions(gold, forget, device) - forget.labels),
                         np.abs(predictions(model, forget, device) - forget.labels), alpha)
    return {"utility": u, "forgetting": f, "combined": u * f}


# -- the whole report ------------------------------------------------------------------------------


@dataclass
class Evaluation:
    retain_acc: float
    forget_acc: float
    test_acc: float
    mia: float
    seconds: float
    retain_gap: float = float("nan")
    forget_gap: float = float("nan")
    test_gap: float = float("nan")
    mia_gap: float = float("nan")
    activation_distance: float = float("nan")
    js_divergence: float = float("nan")
    time_ratio: float = float("nan")
    # regression
    retain_mae: float = float("nan")
    forget_mae: float = float("nan")
    test_mae: float = float("nan")
    utility: float = float("nan")
    forgetting: float = float("nan")
    combined: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model: nn.Module, forget: SampleSet, retain: SampleSet, test: SampleSet, *,
    seconds: float = float("nan"), gold: nn.Module | None = None,
    gold_eval: Evaluation | None = None, device="cpu", seed: int = 0,
) -> Evaluation:
    """All single-model metrics, and the gaps to ``gold`` when given (``gold_eval`` caches the
    gold model's own numbers). Regression gets MAEs, the MIA on squared errors, and the utility,
    forgetting and combined scores against the gold model."""
    if forget.task == "regression":
        return _evaluate_regression(model, forget, retain, test, seconds, gold, gold_eval,
                                    device, seed)
    ev = Evaluation(
        retain_acc=accuracy(model, retain, device), forget_acc=accuracy(model, forget, device),
        test_acc=accuracy(model, test, device),
        mia=mia_accuracy(per_sample_loss(model, forget, device),
                         per_sample_loss(model, test, device), seed=seed),
        seconds=seconds,
    )
    if gold is not None:
        g = gold_eval or evaluate(gold, forget, retain, test, device=device, seed=seed)
        ev.retain_gap = ev.retain_acc - g.retain_acc
        ev.forget_gap = ev.forget_acc - g.forget_acc
        ev.test_gap = ev.test_acc - g.test_acc
        ev.mia_gap = ev.mia - g.mia
        p, q = softmax(logits(model, forget, device)), softmax(logits(gold, forget, device))
        ev.activation_distance = activation_distance(p, q)
        ev.js_divergence = js_divergence(p, q)
        if g.seconds == g.seconds and g.seconds > 0:
            ev.time_ratio = seconds / g.seconds
    return ev


def _evaluate_regression(model, forget, retain, test, seconds, gold, gold_eval, device,
                         seed) -> Evaluation:
    nan = float("nan")
    ev = Evaluation(
        retain_acc=nan, forget_acc=nan, test_acc=nan,
        mia=mia_accuracy(per_sample_loss(model, forget, device),
                         per_sample_loss(model, test, device), seed=seed),
        seconds=seconds, retain_mae=mae(model, retain, device),
        forget_mae=mae(model, forget, device), test_mae=mae(model, test, device),
    )
    if gold is not None:
        g = gold_eval or _evaluate_regression(gold, forget, retain, test, nan, None, None,
                                              device, seed)
        ev.mia_gap = ev.mia - g.mia
        scores = regression_scores(model, gold, forget, test, device=device)
        ev.utility, ev.forgetting, ev.combined = (scores["utility"], scores["forgetting"],
                                                  scores["combined"])
        if g.seconds == g.seconds and g.seconds > 0:
            ev.time_ratio = seconds / g.seconds
    return ev
