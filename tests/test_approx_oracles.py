"""Methods and metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from approx.loop import batch_gradient_importance, fisher_diagonal
from approx.methods.fisher_masking import fisher_mask
from approx.methods.ssd import ssd_dampen
from approx.metrics import (
    activation_distance,
    challenge_score,
    example_epsilon,
    forgetting_quality,
    js_divergence,
    logit_margin,
    mia_accuracy,
    softmax,
)
from approx.requests import ClassForget, RandomForget, SubclassForget, parse_request, split_forget
from sisa_ray.core.data import SampleSet


def test_ssd_rule_on_known_importances():
    p = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([5.0])}
    i_d = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([0.0])}
    i_f = {"w": torch.tensor([5.0, 20.0, 100.0, 0.5]), "b": torch.tensor([1.0])}
    ssd_dampen(p, i_d, i_f, alpha=10.0, lam=1.0)
    # selected where I_f > 10 * I_D: entries 1, 2 and b; factor min(I_D / I_f, 1)
    torch.testing.assert_close(p["w"], torch.tensor([1.0, 2.0 / 20, 3.0 / 100, 4.0]))
    torch.testing.assert_close(p["b"], torch.tensor([0.0]))
    q = {"w": torch.tensor([2.0])}
    ssd_dampen(q, {"w": torch.tensor([1.0])}, {"w": torch.tensor([50.0])}, alpha=10.0, lam=30.0)
    torch.testing.assert_close(q["w"], torch.tensor([2.0 * 30 / 50]))  # lambda scales beta


def linear_problem():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double().float()
    x = np.array([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0], [0.0, 1.0, 1.0]], dtype=np.float32)
    y = np.array([0, 1, 1])
    return model, SampleSet(ids=np.arange(3), features=x, labels=y, n_classes=2)


def test_fisher_diagonal_by_hand_on_a_linear_model():
    model, data = linear_problem()
    w = model.weight.detach().double().numpy()
    b = model.bias.detach().double().numpy()
    x = data.features.astype(np.float64)
    emp_w, emp_b = np.zeros_like(w), np.zeros_like(b)
    exp_w, exp_b = np.zeros_like(w), np.zeros_like(b)
    for xi, yi in zip(x, data.labels):
        p = softmax((w @ xi + b)[None])[0]
        for c in range(2):
            g = p - np.eye(2)[c]  # d/dz of -log p_c
            gw, gb = np.outer(g, xi), g
            exp_w += p[c] * gw ** 2
            exp_b += p[c] * gb ** 2
            if c == yi:
                emp_w += gw ** 2
                emp_b += gb ** 2
    cpu = torch.device("cpu")
    emp = fisher_diagonal(model, data, cpu, kind="empirical")
    exp = fisher_diagonal(model, data, cpu, kind="expected", batch_size=2)
    np.testing.assert_allclose(emp["weight"].numpy(), emp_w / 3, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(emp["bias"].numpy(), emp_b / 3, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(exp["weight"].numpy(), exp_w / 3, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(exp["bias"].numpy(), exp_b / 3, rtol=1e-5, atol=1e-7)
    # one mini-batch of 3: squared mean gradient, not mean squared gradient
    g = np.zeros_like(w)
    for xi, yi in zip(x, data.labels):
        g += np.outer(softmax((w @ xi + b)[None])[0] - np.eye(2)[yi], xi) / 3
    imp = batch_gradient_importance(model, data, cpu, batch_size=3)
    np.testing.assert_allclose(imp["weight"].numpy(), g ** 2, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("ratio", [0.0, 0.02, 0.1, 0.5, 1.0])
def test_fisher_masking_zeroes_exactly_the_fraction(ratio):
    gen = torch.Generator().manual_seed(0)
    ff = {"a": torch.rand(10, 7, generator=gen), "b": torch.rand(13, generator=gen),
          "c": torch.rand(4, 2, 3, 3, generator=gen)}
    fr = {k: torch.rand(v.shape, generator=gen) for k, v in ff.items()}
    masks = fisher_mask(ff, fr, ratio)
    total = sum(v.numel() for v in ff.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(ratio * total)
    if 0 < ratio < 1:  # the masked ones have the highest scores (conv kernels by spatial mean)
        scores = torch.cat([
            (ff[k] - fr[k]).mean(dim=(2, 3), keepdim=True).expand_as(ff[k]).reshape(-1)
            if ff[k].ndim > 2 else (ff[k] - fr[k]).reshape(-1) for k in ff])
        flat = torch.cat([masks[k].reshape(-1) for k in ff])
        assert scores[flat].min() >= scores[~flat].max()


def test_mia_is_chance_on_identical_and_perfect_on_separated_losses():
    rng = np.random.default_rng(0)
    same = mia_accuracy(rng.exponential(1.0, 2000), rng.exponential(1.0, 2000))
    assert 0.45 < same < 0.55
    sep = mia_accuracy(rng.uniform(0, 0.1, 500), rng.uniform(2, 3, 500))
    assert sep > 0.99
    with pytest.raises(ValueError, match="at least 5"):
        mia_accuracy(np.ones(3), np.ones(100))


def test_activation_distance_and_js_hand_values():
    p = softmax(np.random.default_rng(1).normal(size=(20, 5)))
    assert activation_distance(p, p) == 0.0 and js_divergence(p, p) == 0.0
    a, b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    assert activation_distance(a, b) == pytest.approx(math.sqrt(2))
    assert js_divergence(a, b) == pytest.approx(math.log(2))
    c, d = np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]])
    # m = (0.75, 0.25): JS = 0.5*KL(c||m) + 0.5*KL(d||m)
    kl_cm = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl_dm = math.log(1 / 0.75)
    assert js_divergence(c, d) == pytest.approx(0.5 * kl_cm + 0.5 * kl_dm)


def test_example_epsilon_hand_value():
    # attack "unlearned if value <= 2": FNR = 1/4, FPR = 1/4 -> eps = log((1 - d - 1/4) / (1/4))
    d = 1e-5
    assert example_epsilon([0, 1, 2, 3], [2, 3, 4, 5], d) == pytest.approx(math.log(3 - 4 * d))
    assert example_epsilon([0, 0], [1, 1]) == math.inf  # perfectly separable
    assert example_epsilon([1, 2, 3], [1, 2, 3]) == 0.0


def test_forgetting_quality_max_for_identical_and_falls_with_separation():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(64, 30))
    assert forgetting_quality(base, base.copy()) == 1.0
    scores = [forgetting_quality(base + shift, rng.normal(size=(64, 30)))
              for shift in (0.0, 1.0, 3.0, 50.0)]
    assert scores == sorted(scores, reverse=True) and scores[-1] == 0.0 and scores[0] > scores[2]
    # bins of 0.5: eps = log(3) = 1.0986 -> bin 3 -> 2^(1-3)
    u = np.array([[0.0], [1], [2], [3]])
    r = np.array([[2.0], [3], [4], [5]])
    assert forgetting_quality(u, r) == 0.25
    assert challenge_score(0.5, 0.9, 1.0, 0.8, 0.8) == pytest.approx(0.45)


def test_logit_margin():
    z = np.array([[2.0, 5.0, 1.0], [0.0, -1.0, 3.0]])
    np.testing.assert_allclose(logit_margin(z, np.array([1, 0])), [3.0, -3.0])


def test_forget_requests(digits):
    train = digits[0].take(np.arange(400))
    f, r = split_forget(train, RandomForget(fraction=0.1), seed=0)
    assert len(f) == 40 and len(f) + len(r) == 400 and not set(f.ids) & set(r.ids)
    f, _ = split_forget(train, ClassForget(label=3), seed=0)
    assert set(f.labels) == {3} and len(f) == int((train.labels == 3).sum())
    f, r = split_forget(train, SubclassForget(label=3, fraction=0.5), seed=0)
    assert set(f.labels) == {3} and (r.labels == 3).sum() == (train.labels == 3).sum() - len(f)
    assert str(parse_request("subclass:3:0.5")) == "subclass:3:0.5"
    with pytest.raises(ValueError, match="Unknown forget request"):
        parse_request("everything")
    with pytest.raises(ValueError, match="'fraction' parameter of RandomForget"):
        parse_request("random:1.5")
    with pytest.raises(ValueError, match="label 12 does not exist"):
        split_forget(train, ClassForget(label=12), seed=0)


def test_pbu_loss_terms_by_hand():
    from approx.methods.pbu import pbu_loss

    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    star = {"weight": torch.tensor([[0.5, 0.0], [0.0, 1.0]])}
    fisher = {"weight": torch.tensor([[2.0, 1.0], [1.0, 3.0]])}
    x = torch.tensor([[1.0, 1.0]])
    y = torch.tensor([0])
    total, terms = pbu_loss(model, x, y, star, fisher, alpha=1.0, beta=0.5, gamma=0.1)
    # logits (1, 2): log p(0) = 1 - log(e^1 + e^2)
    log_p = 1.0 - math.log(math.exp(1) + math.exp(2))
    fisher_term = 2.0 * 0.5 ** 2 + 3.0 * 1.0 ** 2  # only the diagonal entries moved
    l2 = 0.5 ** 2 + 1.0 ** 2
    assert terms["log_likelihood"].item() == pytest.approx(log_p)
    assert terms["fisher"].item() == pytest.approx(fisher_term)
    assert terms["l2"].item() == pytest.approx(l2)
    assert total.item() == pytest.approx(log_p + 0.5 * fisher_term + 0.1 * l2)
