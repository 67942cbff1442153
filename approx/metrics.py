"""Unlearning metrics: how close an unlearned model is to the gold model (retrained without the
forget set), and how well an attacker can still tell the forget set apart.

* accuracy on retain / forget / test sets and each one's gap to the gold model;
* the NeurIPS 2023 starting kit's membership inference attack (MIA): logistic regression on
  per-sample losses, forget vs test, balanced, cross-validated accuracy (0.5 = the attacker cannot
  tell); and, to compare with the bad-teaching and SSD papers, their entropy MIA;
* activation distance: mean L2 distance between two models' softmax outputs;
* the Jensen-Shannon divergence between two models' softmax outputs; and, to compare with those
  papers, their ``JSDiv`` (another quantity) and the ZRF score built on it;
* the NeurIPS 2023 Machine Unlearning challenge's forgetting quality F, computed as the
  challenge's own metric code computes it, and its final score.
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


def mia_loss_starting_kit(forget_losses: np.ndarray, test_losses: np.ndarray, seed: int = 0,
                          n_splits: int = 10) -> float:
    """Loss-based membership inference attack of the NeurIPS 2023 unlearning challenge's starting kit.

    A logistic regression on the per-sample loss tells forget-set samples (members) from test-set
    samples (non-members); the score is its mean accuracy over ``n_splits`` stratified shuffle
    splits (scikit-learn's ``StratifiedShuffleSplit``, 10 % held out each time), as the kit's
    ``simple_mia``. 0.5 means the attack cannot tell them apart. The kit subsamples the forget
    losses to the number of test losses; here the larger set is subsampled to the smaller one
    (drawn with ``seed``), so the two classes stay balanced whichever set is larger.

    This is the quantity reported as ``Evaluation.mia``. It is not the entropy attack of the
    bad-teaching and SSD papers (:func:`mia_entropy_ssd`).

    Parameters
    ----------
    forget_losses, test_losses : numpy.ndarray
        Per-sample losses of the model on the forget set and on the test set.
    seed : int
        Seeds the subsampling and the splits.
    n_splits : int
        Number of shuffle splits (the kit uses 10).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score

    forget_losses = np.asarray(forget_losses, dtype=np.float64)
    test_losses = np.asarray(test_losses, dtype=np.float64)
    n = min(len(forget_losses), len(test_losses))
    if n < n_splits:
        raise ValueError(f"The loss MIA needs at least {n_splits} forget and {n_splits} test samples "
                         f"(one per split). Got {len(forget_losses)} and {len(test_losses)}; "
                         f"use a larger forget or test set, or fewer 'n_splits'.")
    rng = np.random.default_rng(seed)
    f = rng.choice(forget_losses, n, replace=False)
    t = rng.choice(test_losses, n, replace=False)
    x = np.concatenate([t, f])[:, None]
    y = np.concatenate([np.zeros(n), np.ones(n)])
    cv = StratifiedShuffleSplit(n_splits=n_splits, random_state=seed)
    return float(cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy").mean())


def mia_accuracy(forget_losses: np.ndarray, test_losses: np.ndarray, seed: int = 0,
                 folds: int = 5) -> float:
    """Former name of :func:`mia_loss_starting_kit` (``folds`` is its ``n_splits``)."""
    return mia_loss_starting_kit(forget_losses, test_losses, seed=seed, n_splits=folds)


def prediction_entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (natural log) of each row of a probability matrix; ``0 log 0 = 0``."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)


def mia_entropy_ssd(retain_probs: np.ndarray, forget_probs: np.ndarray,
                    test_probs: np.ndarray) -> float:
    """Entropy-based membership inference attack of the bad-teaching and SSD papers.

    Chundawat et al. 2023, "Can bad teaching induce forgetting?" (code:
    vikram2000/bad-teaching-unlearning), reused by Foster et al. 2024, "Fast machine unlearning
    without retraining through selective synaptic dampening" (code:
    if-loops/selective-synaptic-dampening, ``metrics.get_membership_attack_prob``): a class-balanced
    logistic regression on the entropy of the softmax output is trained to call retain samples
    members (1) and test samples non-members (0); the score is the fraction of forget samples it
    calls members. Lower means more forgotten, and the gold model's value is the target; it is
    not an accuracy, so 0.5 carries no special meaning.

    The reference fits scikit-learn's ``multi_class="multinomial"`` model, which newer
    scikit-learn no longer offers. With two classes that model is the binomial one with twice the
    inverse regularisation (the L2 penalty of the two class vectors ``w`` and ``-w`` of the softmax
    sums to half that of their difference), so ``C=2`` is used here.

    Parameters
    ----------
    retain_probs, forget_probs, test_probs : numpy.ndarray
        Softmax outputs of the model, shape (n_samples, n_classes), on each set.
    """
    from sklearn.linear_model import LogisticRegression

    x_train = np.concatenate([prediction_entropy(retain_probs), prediction_entropy(test_probs)])
    y_train = np.concatenate([np.ones(len(retain_probs)), np.zeros(len(test_probs))])
    attack = LogisticRegression(C=2.0, class_weight="balanced", solver="lbfgs")
    attack.fit(x_train[:, None], y_train)
    return float(attack.predict(prediction_entropy(forget_probs)[:, None]).mean())


def activation_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Mean L2 distance between rows of two probability matrices."""
    return float(np.linalg.norm(np.asarray(p) - np.asarray(q), axis=1).mean())


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Mean Jensen-Shannon divergence (natural log) between rows of two probability matrices.

    The true divergence, ``0.5 KL(p || m) + 0.5 KL(q || m)`` with ``m = (p + q) / 2``, averaged over
    rows: the square of ``scipy.spatial.distance.jensenshannon``. Not the ``JSDiv`` of the
    bad-teaching and SSD code (:func:`jsdiv_bad_teaching`).
    """
    from scipy.spatial.distance import jensenshannon

    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return float(np.mean(jensenshannon(p, q, axis=1) ** 2))


def jsdiv_bad_teaching(p: np.ndarray, q: np.ndarray) -> float:
    """``JSDiv`` as the bad-teaching and SSD code compute it (not a Jensen-Shannon divergence).

    ``0.5 * F.kl_div(log p, m) + 0.5 * F.kl_div(log q, m)`` with ``m = (p + q) / 2`` and PyTorch's
    default ``reduction="mean"``: each term is ``KL(m || p)`` (the mixture first, where the true
    divergence has ``KL(p || m)``), and the mean runs over all ``n_samples * n_classes`` entries,
    so the value is the per-row quantity divided by the number of classes. Chundawat et al. 2023
    (vikram2000/bad-teaching-unlearning), Foster et al. 2024 (if-loops/selective-synaptic-dampening,
    ``metrics.JSDiv``).

    Parameters
    ----------
    p, q : numpy.ndarray
        Probability matrices of shape (n_samples, n_classes).
    """
    from scipy.special import xlogy

    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        # PyTorch's kl_div(input, target) entry by entry: xlogy(target, target) - target * input
        kl_mp = (xlogy(m, m) - m * np.log(p)).mean()
        kl_mq = (xlogy(m, m) - m * np.log(q)).mean()
    return float(0.5 * kl_mp + 0.5 * kl_mq)


def zrf_score(p: np.ndarray, q_incompetent: np.ndarray) -> float:
    """Zero Retrain Forgetting score of Chundawat et al. 2023: ``1 - JSDiv(p, q_incompetent)``.

    ``q_incompetent`` are the outputs, on the forget set, of a randomly initialised model of the
    same architecture (the "incompetent teacher"); ``JSDiv`` is :func:`jsdiv_bad_teaching`, as in
    the reference code's ``UnLearningScore``. 1 means the model answers on the forget set like a
    model that never learned anything.
    """
    return 1.0 - jsdiv_bad_teaching(p, q_incompetent)


# -- NeurIPS 2023 unlearning challenge -------------------------------------------------------------
# The forgetting quality F follows google-deepmind/unlearning_evaluation, metric.py, rule for rule.

#: delta of the (epsilon, delta) guarantee the challenge's attacks estimate.
CHALLENGE_DELTA = 1e-5
#: Epsilon of an example that is perfectly separable or whose spread ratio is under 1 %.
EPSILON_CAP = 50.0
#: Density of the attacks' threshold grids, in thresholds per unit of the statistic.
THRESHOLDS_PER_UNIT = 100
# The reference adds the smallest float32 denormal to both probabilities before the log.
_PROBABILITY_FLOOR = 1e-45
# Interval attacks place their right end within this distance of the peakier sample's maximum.
_INTERVAL_BUFFER = 2.0
# A spread under this fraction of the other distribution's spread gets the capped epsilon.
_SPREAD_RATIO = 0.01


def logit_margin(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """True-class logit minus the largest other logit, per sample."""
    z = np.asarray(z, dtype=np.float64)
    idx = np.arange(len(labels))
    true = z[idx, labels]
    other = z.copy()
    other[idx, labels] = -np.inf
    return true - other.max(axis=1)


def logit_scaled_confidence(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The challenge's per-example statistic ``log p_y - log(1 - p_y)``, from logits.

    As ``compute_logit_scaled_confidence`` in google-deepmind/unlearning_evaluation (itself from
    LiRA, Carlini et al. 2022): ``log(p_y + 1e-45) - log(sum_{j != y} p_j + 1e-45)``, where the
    floor bounds the statistic to about +-103.6. Computed in log space,
    ``log p_y = z_y - logsumexp(z)`` and ``log(1 - p_y) = logsumexp(z_{j != y}) - logsumexp(z)``,
    so no probability is rounded to 1 before the subtraction.

    Parameters
    ----------
    z : numpy.ndarray
        Logits, shape (n_samples, n_classes).
    labels : numpy.ndarray
        True class of each sample.
    """
    from scipy.special import logsumexp

    z = np.asarray(z, dtype=np.float64)
    idx = np.arange(len(labels))
    labels = np.asarray(labels, dtype=np.int64)
    log_total = logsumexp(z, axis=1)
    others = z.copy()
    others[idx, labels] = -np.inf
    log_floor = math.log(_PROBABILITY_FLOOR)
    with np.errstate(divide="ignore"):
        log_p_true = z[idx, labels] - log_total
        log_p_wrong = logsumexp(others, axis=1) - log_total
    return np.logaddexp(log_p_true, log_floor) - np.logaddexp(log_p_wrong, log_floor)


def _counts_at_or_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return len(values) - np.searchsorted(np.sort(values), thresholds, side="left")


def _single_threshold_counts(pos: np.ndarray, neg: np.ndarray):
    """Attacks "positive when value >= t", t on a grid over both samples' range. The grid is
    ``torch.linspace`` in float32, as the reference's."""
    both = np.concatenate([pos, neg])
    lo, hi = both.min(), both.max()
    n = int(np.ceil((hi - lo) * THRESHOLDS_PER_UNIT))
    t = torch.linspace(float(lo), float(hi), n, dtype=torch.float32).double().numpy()
    tp, fp = _counts_at_or_above(pos, t), _counts_at_or_above(neg, t)
    return tp, len(pos) - tp, fp, len(neg) - fp, len(pos), len(neg)


def _interval_counts(pos: np.ndarray, neg: np.ndarray):
    """Attacks "positive when l <= value <= r", positive being the peakier sample (the one with
    the smaller spread; the second one on a tie). Right ends: a grid over the peakier sample's
    maximum +- 2; left ends: a grid over ``r - width +- 2``, width the smaller spread."""
    pos_spread, neg_spread = np.ptp(pos), np.ptp(neg)
    width = neg_spread if pos_spread > neg_spread else pos_spread
    if pos_spread >= neg_spread:
        pos, neg = neg, pos
    lo = pos.min() + width - _INTERVAL_BUFFER
    hi = pos.max() + _INTERVAL_BUFFER
    right = np.linspace(lo, hi, int(np.ceil((hi - lo) * THRESHOLDS_PER_UNIT)))
    n_left = int(np.ceil(2 * _INTERVAL_BUFFER * THRESHOLDS_PER_UNIT))
    left = np.linspace(right - width - _INTERVAL_BUFFER, right - width + _INTERVAL_BUFFER, n_left,
                       axis=1).ravel()
    right = np.repeat(right, n_left)

    def inside(values):
        s = np.sort(values)
        n_in = np.searchsorted(s, right, side="right") - np.searchsorted(s, left, side="left")
        return np.maximum(n_in, 0)

    tp, fp = inside(pos), inside(neg)
    return tp, len(pos) - tp, fp, len(neg) - fp, len(pos), len(neg)


def _attack_epsilons(tp, fn, fp, tn, n_pos, n_neg, delta: float) -> np.ndarray:
    """Epsilon of each attack, in float32 as the reference computes its rates: infinite when both
    error rates are 0 (perfect separation), NaN (no estimate, the attack is dropped) when exactly
    one is 0, else ``max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR))`` clipped at 0."""
    fnr = fn.astype(np.float32) / np.float32(n_pos)
    fpr = fp.astype(np.float32) / np.float32(n_neg)
    one = np.float32(1 - delta)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.fmax(np.log(one - fpr) - np.log(fnr), np.log(one - fnr) - np.log(fpr))
    eps = np.clip(eps, 0, None)
    perfect = (fpr == 0) & (fnr == 0)
    return np.where(perfect, np.inf, np.where((fpr == 0) | (fnr == 0), np.nan, eps))


def example_epsilon(unlearned: np.ndarray, retrained: np.ndarray,
                    delta: float = CHALLENGE_DELTA) -> float:
    """Privacy epsilon of one forget example, as the NeurIPS 2023 unlearning challenge estimates it.

    google-deepmind/unlearning_evaluation, metric.py (``_get_epsilons``). The two 1-D samples hold
    the example's statistic (:func:`logit_scaled_confidence`) under several unlearned and several
    retrained models. The positive class is the sample with the larger median (the unlearned one
    on a tie).

    * If the smaller spread (max - min) is under 1 % of the larger, epsilon is ``EPSILON_CAP`` (50):
      one distribution is a spike. Two spikes (0 / 0) go on to the attacks.
    * Threshold attacks: "positive when value >= t", ``ceil(100 * range)`` thresholds over both
      samples' range.
    * Interval attacks: "peakier sample when l <= value <= r", ``r`` on a grid of about 400
      points over the peakier sample's ``max +- 2``, and for each ``r``, 400 values of ``l`` over
      ``r - w +- 2``, w the smaller spread (on equal spreads the peakier one is the sample with
      the smaller median, the retrained one if the medians tie).
    * Each attack's epsilon is ``max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR))``
      clipped at 0; infinite when FPR = FNR = 0; an attack with exactly one zero rate is dropped.
    * Epsilon is the largest over attacks, clipped to ``[0, EPSILON_CAP]``. Where every attack is
      dropped (two identical spikes) the reference fails; here epsilon is 0.

    Parameters
    ----------
    unlearned, retrained : numpy.ndarray
        The statistic of one example under each unlearned and each retrained model.
    delta : float
        The delta of the guarantee (the challenge uses 1e-5).
    """
    u = np.asarray(unlearned, dtype=np.float64).ravel()
    r = np.asarray(retrained, dtype=np.float64).ravel()
    pos, neg = (r, u) if np.median(r) > np.median(u) else (u, r)
    spreads = np.array([np.ptp(pos), np.ptp(neg)])
    with np.errstate(divide="ignore", invalid="ignore"):
        if spreads.min() / spreads.max() < _SPREAD_RATIO:
            return EPSILON_CAP
    eps = np.concatenate([_attack_epsilons(*_interval_counts(pos, neg), delta),
                          _attack_epsilons(*_single_threshold_counts(pos, neg), delta)])
    eps = eps[~np.isnan(eps)]
    return float(np.clip(eps.max(), 0, EPSILON_CAP)) if len(eps) else 0.0


def forgetting_quality(unlearned_stats: np.ndarray, retrained_stats: np.ndarray,
                       delta: float = CHALLENGE_DELTA, bin_width: float = 0.5) -> float:
    """The NeurIPS 2023 unlearning challenge's forgetting quality F.

    google-deepmind/unlearning_evaluation, metric.py (``compute_forget_score_from_confs``). Each
    forget example's :func:`example_epsilon` earns points by bin: ``[0, 0.5)`` 1 point,
    ``[0.5, 1)`` 1/2, ``[1, 1.5)`` 1/4, ..., and 0 points from ``ceil(log(M - 1))`` on, for M
    models (the largest epsilon M samples can resolve; 4 for 32 models, so eps >= 4 scores 0).
    F is the mean of the points over the forget examples. The statistic the challenge uses is
    :func:`logit_scaled_confidence`.

    Parameters
    ----------
    unlearned_stats, retrained_stats : numpy.ndarray
        The statistic, shape (n_models, n_forget_examples), under the unlearned and the retrained
        models (the same number of each).
    delta : float
        The delta of the guarantee.
    bin_width : float
        Width of the epsilon bins (the challenge uses 0.5).
    """
    u = np.asarray(unlearned_stats, dtype=np.float64)
    r = np.asarray(retrained_stats, dtype=np.float64)
    if u.ndim != 2 or u.shape != r.shape or u.size == 0:
        raise ValueError(f"The statistics of forgetting_quality must be non-empty arrays of shape "
                         f"(n_models, n_forget_examples), the same for unlearned and retrained "
                         f"models. Got {u.shape} and {r.shape}; stack one row per model.")
    with np.errstate(divide="ignore", invalid="ignore"):
        max_epsilon = float(np.ceil(np.log(u.shape[0] - 1)))
    eps = np.array([example_epsilon(u[:, j], r[:, j], delta) for j in range(u.shape[1])])
    k = np.floor(eps / bin_width)
    points = np.where((k + 1) * bin_width <= max_epsilon, 0.5 ** k, 0.0)
    return float(points.mean())


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
    """One model's metrics; the field names are stable (the comparison table and MLflow use them).

    Attributes
    ----------
    retain_acc, forget_acc, test_acc
        Accuracy on each set.
    mia
        The NeurIPS 2023 starting kit's loss MIA, forget vs test (:func:`mia_loss_starting_kit`):
        cross-validated accuracy, 0.5 = the attacker cannot tell.
    mia_entropy_ssd
        The bad-teaching / SSD papers' entropy MIA (:func:`mia_entropy_ssd`): fraction of the
        forget set an attack trained on retain vs test calls members. The number to set beside
        those papers' "MIA" columns.
    seconds
        Time the method took.
    retain_gap, forget_gap, test_gap, mia_gap
        The model's value minus the gold model's.
    activation_distance
        Mean L2 distance between the model's and the gold model's softmax on the forget set.
    js_divergence
        True Jensen-Shannon divergence between the same two (:func:`js_divergence`).
    jsdiv_bad_teaching
        The bad-teaching / SSD code's ``JSDiv`` between the same two (:func:`jsdiv_bad_teaching`).
    zrf
        Zero Retrain Forgetting score, ``1 - JSDiv`` against a randomly initialised model of the
        same architecture on the forget set (:func:`zrf_score`); NaN unless ``evaluate`` is given
        ``incompetent``.
    time_ratio
        ``seconds`` over the gold model's retraining time.
    retain_mae, forget_mae, test_mae, utility, forgetting, combined
        Regression only (:func:`regression_scores`).
    """

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
    # comparable with the bad-teaching and SSD papers' tables
    mia_entropy_ssd: float = float("nan")
    jsdiv_bad_teaching: float = float("nan")
    zrf: float = float("nan")
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
    incompetent: nn.Module | None = None,
) -> Evaluation:
    """All single-model metrics, and the gaps to ``gold`` when given (``gold_eval`` caches the
    gold model's own numbers); ``incompetent``, a randomly initialised model of the same
    architecture, gives the ZRF score. Regression gets MAEs, the MIA on squared errors, and the
    utility, forgetting and combined scores against the gold model."""
    if forget.task == "regression":
        return _evaluate_regression(model, forget, retain, test, seconds, gold, gold_eval,
                                    device, seed)
    p_forget = softmax(logits(model, forget, device))
    ev = Evaluation(
        retain_acc=accuracy(model, retain, device), forget_acc=accuracy(model, forget, device),
        test_acc=accuracy(model, test, device),
        mia=mia_loss_starting_kit(per_sample_loss(model, forget, device),
                                  per_sample_loss(model, test, device), seed=seed),
        mia_entropy_ssd=mia_entropy_ssd(softmax(logits(model, retain, device)), p_forget,
                                        softmax(logits(model, test, device))),
        seconds=seconds,
    )
    if incompetent is not None:
        ev.zrf = zrf_score(p_forget, softmax(logits(incompetent, forget, device)))
    if gold is not None:
        g = gold_eval or evaluate(gold, forget, retain, test, device=device, seed=seed)
        ev.retain_gap = ev.retain_acc - g.retain_acc
        ev.forget_gap = ev.forget_acc - g.forget_acc
        ev.test_gap = ev.test_acc - g.test_acc
        ev.mia_gap = ev.mia - g.mia
        q = softmax(logits(gold, forget, device))
        ev.activation_distance = activation_distance(p_forget, q)
        ev.js_divergence = js_divergence(p_forget, q)
        ev.jsdiv_bad_teaching = jsdiv_bad_teaching(p_forget, q)
        if g.seconds == g.seconds and g.seconds > 0:
            ev.time_ratio = seconds / g.seconds
    return ev


def _evaluate_regression(model, forget, retain, test, seconds, gold, gold_eval, device,
                         seed) -> Evaluation:
    nan = float("nan")
    ev = Evaluation(
        retain_acc=nan, forget_acc=nan, test_acc=nan,
        mia=mia_loss_starting_kit(per_sample_loss(model, forget, device),
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
