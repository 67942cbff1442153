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
    # the reference's units: Linear entries and whole conv kernels; biases never; int(ratio * N)
    scores = torch.cat([(ff["a"] - fr["a"]).reshape(-1),
                        (ff["c"] - fr["c"]).mean(dim=(2, 3)).reshape(-1)])
    flat = torch.cat([masks["a"].reshape(-1), masks["c"][:, :, 0, 0].reshape(-1)])
    assert int(flat.sum()) == int(ratio * len(scores)) and not masks["b"].any()
    assert torch.equal(masks["c"], masks["c"][:, :, :1, :1].expand_as(masks["c"]))
    if 0 < ratio < 1:  # the masked units have the highest scores (conv kernels by spatial mean)
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
    assert example_epsilon([0, 0], [1, 1]) == 50.0  # perfectly separable: the reference's cap
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


# --- Method oracles: one step (or one edit) of each method against its rule, by hand -----------
#
# Each test builds a linear softmax model on a few points, where the gradients of the losses are
# closed-form: for logits z = X W^T + b and a loss whose gradient in z is G (rows per sample),
# dW = G^T X and db = sum of G's rows. Where a test could pass by accident, it also checks that a
# plausible wrong rule gives a different answer, so the oracle can tell them apart.


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _linear(n_in, n_out, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(n_in, n_out)
    with torch.no_grad():
        model.weight.copy_(torch.randn(n_out, n_in, generator=gen))
        model.bias.copy_(0.1 * torch.randn(n_out, generator=gen))
    return model


def _params(model):
    return model.weight.detach().double().numpy().copy(), model.bias.detach().double().numpy().copy()


def _samples(x, y, n_classes, start=0):
    x = np.asarray(x, dtype=np.float32)
    return SampleSet(ids=np.arange(start, start + len(x)), features=x, labels=np.asarray(y),
                     n_classes=n_classes)


def _points(n, n_in, n_classes, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n_in)).astype(np.float32), rng.integers(0, n_classes, size=n)


def _ce_grad_logits(w, b, x, y, n_classes):
    """d/dz of the mean cross-entropy over the rows of x: (softmax(z) - onehot(y)) / n."""
    p = _softmax(x.astype(np.float64) @ w.T + b)
    return (p - np.eye(n_classes)[y]) / len(x)


def _step(w, b, x, g_logits, lr):
    """One SGD step (no momentum, no weight decay) from the gradient in the logits."""
    x = x.astype(np.float64)
    return w - lr * g_logits.T @ x, b - lr * g_logits.sum(0)


def _assert_model(model, w, b, atol=1e-6):
    np.testing.assert_allclose(model.weight.detach().double().numpy(), w, rtol=1e-5, atol=atol)
    np.testing.assert_allclose(model.bias.detach().double().numpy(), b, rtol=1e-5, atol=atol)


SGD_ONE_BATCH = {"epochs": 1, "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0,
                 "batch_size": 256}


def _config(name, **kw):
    from approx import get_method

    return get_method(name).config_cls(**kw)


# SSD (Foster et al.; reference ParameterPerturber.calc_importance / modify_weight)


def _ssd_importance(w, b, x, y, n_classes, batch):
    """Mean over mini-batches (in order) of the squared gradient of the batch's mean CE."""
    iw, ib, n_batches = np.zeros_like(w), np.zeros_like(b), 0
    for s in range(0, len(x), batch):
        g = _ce_grad_logits(w, b, x[s:s + batch], y[s:s + batch], n_classes)
        iw += (g.T @ x[s:s + batch].astype(np.float64)) ** 2
        ib += g.sum(0) ** 2
        n_batches += 1
    return iw / n_batches, ib / n_batches


def _ssd_by_hand(w, b, full, forget, n_classes, batch, alpha, lam, *, mean=True):
    out = []
    for p, i_d, i_f in zip((w, b), _ssd_importance(w, b, *full, n_classes, batch),
                           _ssd_importance(w, b, *forget, n_classes, batch)):
        if not mean:  # the wrong rule: sums over batches instead of means
            i_d = i_d * -(-len(full[0]) // batch)
            i_f = i_f * -(-len(forget[0]) // batch)
        beta = np.minimum(lam * i_d / i_f, 1.0)
        out.append(np.where(i_f > alpha * i_d, p * beta, p))
    return out


def _ssd_problem(n_retain, n_forget, request, seed=0):
    n_in, c = 4, 3
    xr, yr = _points(n_retain, n_in, c, seed)
    xf, yf = _points(n_forget, n_in, c, seed + 1)
    if request.kind == "class":
        yf = np.full(n_forget, request.label)
        yr = np.where(yr == request.label, (yr + 1) % c, yr)
    else:
        yf = (yf + 1) % c  # forget samples with unusual labels: their gradients stand out
    from approx import UnlearningData

    data = UnlearningData(forget=_samples(xf, yf, c, 1000), retain=_samples(xr, yr, c),
                          request=request)
    full = (np.concatenate([xr, xf]), np.concatenate([yr, yf]))  # retain, then forget
    return _linear(n_in, c, seed), data, full, (xf, yf), (xr, yr), c


def test_ssd_importance_batch_size_follows_the_reference_per_kind():
    from approx.methods.ssd import SSDConfig, importance_batch_size

    assert importance_batch_size(SSDConfig(), "random") == 128
    assert importance_batch_size(SSDConfig(), "class") == 64
    assert importance_batch_size(SSDConfig(), "subclass") == 64
    assert importance_batch_size(SSDConfig(batch_size=16), "random") == 16
    with pytest.raises(ValueError, match="'batch_size' parameter of SSDConfig"):
        SSDConfig(batch_size=0)


def test_ssd_one_edit_by_hand_forget_and_full_set_mean_importances():
    from approx import run_method

    model, data, full, forget, retain, c = _ssd_problem(9, 3, RandomForget(fraction=0.25))
    w, b = _params(model)
    alpha, lam, batch = 2.0, 0.8, 3
    exp_w, exp_b = _ssd_by_hand(w, b, full, forget, c, batch, alpha, lam)
    out = run_method("ssd", model, data, _config("ssd", alpha=alpha, lam=lam, batch_size=batch))
    _assert_model(out.model, exp_w, exp_b)
    changed = int((exp_w != w).sum() + (exp_b != b).sum())
    assert 0 < changed < w.size + b.size  # some weights dampened, not all
    # the oracle tells the rule from its plausible mutations
    wrong_set = _ssd_by_hand(w, b, retain, forget, c, batch, alpha, lam)
    wrong_sum = _ssd_by_hand(w, b, full, forget, c, batch, alpha, lam, mean=False)
    for wrong in (wrong_set, wrong_sum):
        assert not np.allclose(wrong[0], exp_w, rtol=1e-4) or not np.allclose(wrong[1], exp_b)


@pytest.mark.parametrize("request_, batch", [(RandomForget(fraction=0.1), 128),
                                             (ClassForget(label=2), 64)])
def test_ssd_default_uses_the_reference_batch_for_the_kind(request_, batch):
    from approx import run_method

    model, data, full, forget, _, c = _ssd_problem(180, 70, request_, seed=4)
    w, b = _params(model)
    expected = _ssd_by_hand(w, b, full, forget, c, batch, 10.0, 1.0)
    other = _ssd_by_hand(w, b, full, forget, c, 192 - batch, 10.0, 1.0)  # 64 <-> 128
    assert not (np.allclose(expected[0], other[0]) and np.allclose(expected[1], other[1]))
    out = run_method("ssd", model, data)
    _assert_model(out.model, *expected)


# Fisher forgetting (Golatkar et al.; reference Forgetting.ipynb, hessian / get_mean_var)


def _fisher_mean_var_by_hand(p, f, *, is_out, forget_class, alpha, conv_dims=(1,)):
    """get_mean_var of the reference, in NumPy."""
    var = np.minimum(1.0 / (f + 1e-8), 1e3)
    if is_out:
        var = np.minimum(var, 1e2)
    var = alpha * var
    if p.ndim > 1:
        var = np.broadcast_to(var.mean(axis=conv_dims, keepdims=True), p.shape).copy()
    mu = p.copy()
    if is_out and forget_class is not None:
        mu[forget_class] = 0
        var[forget_class] = 1e-4
    if is_out or p.ndim == 1:
        var = var * 10
    return mu, var


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))


def test_fisher_forgetting_noise_scale_by_hand_on_a_small_cnn():
    from approx.methods.fisher_forgetting import FisherForgettingConfig, fisher_noise_scale

    model = _small_cnn()
    gen = torch.Generator().manual_seed(1)
    # Fisher values from 1e-4 (inverse clamped) to 10, varying across every dimension
    fisher = {k: 10.0 ** (5 * torch.rand(v.shape, generator=gen, dtype=torch.float64) - 4)
              for k, v in model.named_parameters()}
    out_names = {"3.weight", "3.bias"}
    alpha = 1e-3
    for forget_class in (None, 2):
        dist = fisher_noise_scale(model, {k: v.float() for k, v in fisher.items()},
                                  FisherForgettingConfig(alpha=alpha), forget_class)
        for name, p in model.named_parameters():
            p_np = p.detach().double().numpy()
            f_np = fisher[name].float().double().numpy()
            mu, var = _fisher_mean_var_by_hand(p_np, f_np, is_out=name in out_names,
                                               forget_class=forget_class, alpha=alpha)
            np.testing.assert_allclose(dist[name][0].double().numpy(), mu, rtol=1e-6, atol=0)
            np.testing.assert_allclose(dist[name][1].double().numpy(), var, rtol=1e-5, atol=0)
    # the conv kernel (3, 2, 2, 2) keeps its spatial positions: averaging over dimensions 1-3
    # (the previous rule) gives a different variance
    p_np = model[0].weight.detach().double().numpy()
    f_np = fisher["0.weight"].float().double().numpy()
    ref = _fisher_mean_var_by_hand(p_np, f_np, is_out=False, forget_class=None, alpha=alpha)[1]
    alt = _fisher_mean_var_by_hand(p_np, f_np, is_out=False, forget_class=None, alpha=alpha,
                                   conv_dims=(1, 2, 3))[1]
    assert np.abs(ref / alt - 1).max() > 0.1


def test_fisher_forgetting_redraws_from_the_expected_fisher_by_hand():
    """The whole method on a linear model: expected Fisher of the retain set (by hand), the
    reference's mean and variance, and the standard normal draws of a generator seeded with the
    method's seed, in named_parameters order."""
    from approx import UnlearningData, run_method

    c, n_in = 4, 3
    xr, yr = _points(12, n_in, c, 5)
    xf = _points(3, n_in, c, 6)[0]
    yr = np.where(yr == 1, 0, yr)
    data = UnlearningData(forget=_samples(xf, np.ones(3, dtype=np.int64), c, 100),
                          retain=_samples(xr, yr, c), request=ClassForget(label=1))
    model = _linear(n_in, c, seed=2)
    w, b = _params(model)
    alpha, seed = 1e-3, 7

    def fisher_by_hand(empirical):
        fw, fb = np.zeros_like(w), np.zeros_like(b)
        for xi, yi in zip(xr.astype(np.float64), yr):
            p = _softmax((w @ xi + b)[None])[0]
            for k in range(c):
                g = p - np.eye(c)[k]  # d/dz of -log p_k
                weight = float(k == yi) if empirical else p[k]
                fw += weight * np.outer(g, xi) ** 2
                fb += weight * g ** 2
        return fw / len(xr), fb / len(xr)

    def redraw(fw, fb):
        gen = torch.Generator().manual_seed(seed)
        out = []
        for p, f in ((w, fw), (b, fb)):
            mu, var = _fisher_mean_var_by_hand(p, f, is_out=True, forget_class=1, alpha=alpha)
            z = torch.randn(p.shape, generator=gen).double().numpy()
            out.append(mu + np.sqrt(var) * z)
        return out

    expected = redraw(*fisher_by_hand(empirical=False))
    result = run_method("fisher_forgetting", model, data,
                        _config("fisher_forgetting", alpha=alpha), seed=seed)
    _assert_model(result.model, *expected, atol=1e-6)
    assert np.all(expected[0][1] != 0) and np.abs(expected[0][1]).max() < 0.5  # row 1 redrawn at 0
    empirical = redraw(*fisher_by_hand(empirical=True))
    assert np.abs(empirical[0] - expected[0]).max() > 1e-3


# Methods that train: one SGD step over one batch holding every sample


def _one_batch_problem(n_forget, n_retain, c, seed, request=None):
    from approx import UnlearningData

    n_in = 4
    xf, yf = _points(n_forget, n_in, c, seed)
    xr, yr = _points(n_retain, n_in, c, seed + 1)
    data = UnlearningData(forget=_samples(xf, yf, c, 1000), retain=_samples(xr, yr, c),
                          request=request or RandomForget(fraction=0.3))
    return _linear(n_in, c, seed), data, (xf, yf), (xr, yr)


def test_negative_gradient_ascends_the_forget_loss_by_hand():
    from approx import run_method

    c, lr = 3, 0.5
    model, data, (xf, yf), (xr, yr) = _one_batch_problem(5, 4, c, 11)
    w, b = _params(model)
    # plain ascent: w + lr * grad CE(forget)
    g = -_ce_grad_logits(w, b, xf, yf, c)
    out = run_method("negative_gradient", model, data,
                     _config("negative_gradient", lr=lr, **SGD_ONE_BATCH))
    _assert_model(out.model, *_step(w, b, xf, g, lr))
    # NegGrad+: the batch mean of -CE on forget samples and retain_weight * CE on retain samples
    rw, n = 0.5, len(xf) + len(xr)
    g = np.concatenate([-_ce_grad_logits(w, b, xf, yf, c) * len(xf),
                        rw * _ce_grad_logits(w, b, xr, yr, c) * len(xr)]) / n
    out = run_method("negative_gradient", model, data,
                     _config("negative_gradient", lr=lr, retain_weight=rw, **SGD_ONE_BATCH))
    _assert_model(out.model, *_step(w, b, np.concatenate([xf, xr]), g, lr))


def test_random_labels_trains_on_wrong_labels_by_hand():
    """With two classes the only wrong label is the other one, so the step is known exactly."""
    from approx import run_method

    c, lr = 2, 0.5
    model, data, (xf, yf), (xr, yr) = _one_batch_problem(4, 5, c, 12)
    w, b = _params(model)
    x = np.concatenate([xf, xr])
    y = np.concatenate([1 - yf, yr])
    out = run_method("random_labels", model, data, _config("random_labels", lr=lr, **SGD_ONE_BATCH))
    _assert_model(out.model, *_step(w, b, x, _ce_grad_logits(w, b, x, y, c), lr))


def test_random_wrong_labels_are_uniform_among_the_other_classes():
    from approx.methods.random_labels import random_wrong_labels

    y = np.repeat(np.arange(5), 2000)
    wrong = random_wrong_labels(y, 5, np.random.default_rng(0))
    assert not np.any(wrong == y)
    for k in range(5):
        counts = np.bincount(wrong[y == k], minlength=5) / 2000
        assert counts[k] == 0 and np.all(np.abs(np.delete(counts, k) - 0.25) < 0.04)


def test_bad_teacher_step_by_hand():
    """The reference's UnlearnerLoss: KL to the incompetent teacher on forget samples and to the
    original model on retain samples, element-wise mean over batch x classes, temperature T."""
    from approx import run_method
    from approx.methods.bad_teacher import reinitialised
    from sisa_ray.core.training import seeded

    c, lr, t, seed = 3, 2.0, 2.0, 5
    model, data, (xf, _), (xr, _) = _one_batch_problem(4, 6, c, 13)
    w, b = _params(model)
    with seeded(seed, torch.device("cpu")):  # the method's incompetent teacher
        bw, bb = _params(reinitialised(model))
    x = np.concatenate([xf, xr]).astype(np.float64)
    is_forget = np.arange(len(x)) < len(xf)

    def expected(forget_teacher, retain_teacher):
        target = np.where(is_forget[:, None], _softmax((x @ forget_teacher[0].T + forget_teacher[1]) / t),
                          _softmax((x @ retain_teacher[0].T + retain_teacher[1]) / t))
        student = _softmax((x @ w.T + b) / t)
        return _step(w, b, x, (student - target) / (t * len(x) * c), lr)

    right = expected((bw, bb), (w, b))
    out = run_method("bad_teacher", model, data,
                     _config("bad_teacher", lr=lr, temperature=t, retain_fraction=1.0,
                             **SGD_ONE_BATCH), seed=seed)
    _assert_model(out.model, *right)
    swapped = expected((w, b), (bw, bb))
    assert np.abs(swapped[0] - right[0]).max() > 1e-3


def test_random_perturbation_noise_by_hand():
    """No fine-tuning (epochs 0): each tensor moves by beta * std(tensor) * z, z drawn from a
    generator seeded with the method's seed, in parameters() order."""
    from approx import run_method

    model, data, _, _ = _one_batch_problem(3, 6, 3, 14)
    w, b = _params(model)
    beta, seed = 0.5, 9
    gen = torch.Generator().manual_seed(seed)
    exp = [p + beta * p.std(ddof=1) * torch.randn(p.shape, generator=gen).double().numpy()
           for p in (w, b)]
    out = run_method("random_perturbation", model, data,
                     _config("random_perturbation", beta=beta, epochs=0), seed=seed)
    _assert_model(out.model, *exp)
    assert np.abs(exp[0] - w).min() > 0


def test_adversarial_step_by_formula():
    """One discriminator step (Adam, forget = 1, retain = 0, on the detached softmax outputs),
    then one model step on adv_weight * BCE(D(softmax(forget outputs)), 0), i.e. the forget
    outputs made to look like retain outputs, plus the batch-mean KL to the original model on
    retain samples."""
    from approx import run_method
    from sisa_ray.core.training import seeded

    c, lr, seed, hidden, disc_lr, adv = 3, 0.5, 4, 8, 0.05, 2.0
    model, data, (xf, _), (xr, _) = _one_batch_problem(4, 6, c, 15)
    x = torch.from_numpy(np.concatenate([xf, xr]))
    is_forget = (torch.arange(len(x)) < len(xf)).float()
    bce = nn.functional.binary_cross_entropy_with_logits

    def expected(fool_target):
        with seeded(seed, torch.device("cpu")):  # the method's discriminator initialisation
            disc = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        student = _linear(4, c, 15)
        probs = torch.softmax(student(x), dim=1)
        opt = torch.optim.Adam(disc.parameters(), lr=disc_lr)
        bce(disc(probs.detach()).squeeze(1), is_forget).backward()
        opt.step()
        f, r = is_forget.bool(), ~is_forget.bool()
        fooled = bce(disc(probs[f]).squeeze(1), torch.full((int(f.sum()),), fool_target))
        with torch.no_grad():
            teacher = torch.softmax(model(x[r]), dim=1)
        kl = nn.functional.kl_div(torch.log_softmax(student(x)[r], dim=1), teacher,
                                  reduction="batchmean")
        (adv * fooled + kl).backward()
        with torch.no_grad():
            return [(p - lr * p.grad).double().numpy() for p in (student.weight, student.bias)]

    right = expected(0.0)
    out = run_method("adversarial", model, data,
                     _config("adversarial", lr=lr, disc_lr=disc_lr, disc_hidden=hidden,
                             adv_weight=adv, **SGD_ONE_BATCH), seed=seed)
    _assert_model(out.model, *right, atol=1e-5)
    flipped = expected(1.0)
    assert np.abs(flipped[0] - right[0]).max() > 1e-3


def test_finetune_descends_the_retain_loss_only_by_hand():
    from approx import run_method

    c, lr = 3, 0.5
    model, data, _, (xr, yr) = _one_batch_problem(4, 6, c, 16)
    w, b = _params(model)
    cfg = _config("finetune", lr=lr, schedule="none", **SGD_ONE_BATCH)
    out = run_method("finetune", model, data, cfg)
    _assert_model(out.model, *_step(w, b, xr, _ce_grad_logits(w, b, xr, yr, c), lr))


def test_pbu_first_step_lowers_the_forget_likelihood_by_hand():
    """At theta = theta* the Fisher and L2 terms have zero gradient, so the first step is plain
    descent on alpha * mean log p(y_f | x_f), i.e. ascent on the forget cross-entropy."""
    from approx import run_method

    c, lr, alpha = 3, 0.5, 2.0
    model, data, (xf, yf), _ = _one_batch_problem(5, 3, c, 17, request=ClassForget(label=1))
    yf = np.ones(len(xf), dtype=np.int64)
    data = type(data)(forget=_samples(xf, yf, c, 1000), retain=data.retain, request=data.request)
    w, b = _params(model)
    out = run_method("pbu", model, data, _config("pbu", lr=lr, alpha=alpha, **SGD_ONE_BATCH))
    _assert_model(out.model, *_step(w, b, xf, -alpha * _ce_grad_logits(w, b, xf, yf, c), lr))


def test_finetune_default_recipe_is_the_starting_kits_by_hand():
    """SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine annealing with T_max = epochs stepped
    once per epoch. Four copies of one sample make every batch the same, so the weights depend on
    the learning-rate sequence only: epoch 1 at 0.1, epoch 2 at 0.1 * (1 + cos(pi / 2)) / 2."""
    from approx import UnlearningData, run_method

    c = 3
    x1, y1 = _points(1, 4, c, 18)
    x, y = np.repeat(x1, 4, axis=0), np.repeat(y1, 4)
    data = UnlearningData(forget=_samples(x1, y1, c, 100), retain=_samples(x, y, c),
                          request=RandomForget(fraction=0.2))
    model = _linear(4, c, 18)
    w, b = _params(model)
    buf = None
    for lr in (0.1, 0.1, 0.05, 0.05):  # two batches of two per epoch
        g = _ce_grad_logits(w, b, x1, y1, c)
        grads = (g.T @ x1.astype(np.float64) + 5e-4 * w, g.sum(0) + 5e-4 * b)
        buf = grads if buf is None else tuple(0.9 * m + d for m, d in zip(buf, grads))
        w, b = w - lr * buf[0], b - lr * buf[1]
    out = run_method("finetune", model, data, _config("finetune", epochs=2, batch_size=2))
    _assert_model(out.model, w, b)


def _adam_by_hand(w, b, grad_fn, lr, steps, beta1=0.9, beta2=0.999, eps=1e-8):
    """Adam (no weight decay) for ``steps`` full-batch steps; grad_fn(w, b) -> (dW, db)."""
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    p = [w, b]
    for t in range(1, steps + 1):
        for i, g in enumerate(grad_fn(*p)):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            p[i] = p[i] - lr * (m[i] / (1 - beta1 ** t)) / (np.sqrt(v[i] / (1 - beta2 ** t)) + eps)
    return p


def test_regression_random_labels_move_every_target_by_lo_to_hi_both_ways():
    from approx.methods.random_labels import shifted_targets

    y = np.linspace(-1, 1, 400).astype(np.float32)
    out = shifted_targets(y, 3.0, 6.0, np.random.default_rng(0))
    moved = out - y
    assert out.dtype == y.dtype and (np.abs(moved) >= 3.0 - 1e-5).all()
    assert (np.abs(moved) <= 6.0 + 1e-5).all()
    assert (moved > 0).any() and (moved < 0).any()


def test_random_labels_default_recipe_by_hand():
    """The amnesiac recipe of Foster et al.'s code: Adam lr 1e-4, 3 epochs, batch 128 (here one
    batch per epoch), the relabelled forget set mixed with all of the retain set."""
    from approx import run_method

    c = 2
    model, data, (xf, yf), (xr, yr) = _one_batch_problem(4, 5, c, 19)
    w, b = _params(model)
    x = np.concatenate([xf, xr]).astype(np.float64)
    y = np.concatenate([1 - yf, yr])

    def grads(w_, b_):
        g = _ce_grad_logits(w_, b_, x, y, c)
        return g.T @ x, g.sum(0)

    out = run_method("random_labels", model, data)
    _assert_model(out.model, *_adam_by_hand(w, b, grads, 1e-4, 3), atol=1e-7)


def test_bad_teacher_default_recipe_by_hand():
    """The reference's blindspot defaults: Adam lr 1e-4, one epoch, batch 256, temperature 1,
    int(0.3 * len(retain)) retain samples. The retain set is five copies of one sample, so which
    ones are drawn does not matter, only how many: int(1.5) = 1."""
    from approx import UnlearningData, run_method
    from approx.methods.bad_teacher import reinitialised
    from sisa_ray.core.training import seeded

    c, seed = 3, 2
    xf, yf = _points(4, 4, c, 20)
    xr1, yr1 = _points(1, 4, c, 21)
    data = UnlearningData(forget=_samples(xf, yf, c, 100),
                          retain=_samples(np.repeat(xr1, 5, axis=0), np.repeat(yr1, 5), c),
                          request=RandomForget(fraction=0.4))
    model = _linear(4, c, 20)
    w, b = _params(model)
    with seeded(seed, torch.device("cpu")):
        bw, bb = _params(reinitialised(model))

    def grads_for(n_retain):
        x = np.concatenate([xf, np.repeat(xr1, n_retain, axis=0)]).astype(np.float64)
        target = np.concatenate([_softmax(x[:4] @ bw.T + bb), _softmax(x[4:] @ w.T + b)])

        def grads(w_, b_):
            g = (_softmax(x @ w_.T + b_) - target) / (len(x) * c)
            return g.T @ x, g.sum(0)

        return grads

    out = run_method("bad_teacher", model, data, seed=seed)
    _assert_model(out.model, *_adam_by_hand(w, b, grads_for(1), 1e-4, 1), atol=1e-7)
    # Adam's first step is nearly sign-only; an SGD step shows the retain count itself
    out = run_method("bad_teacher", model, data, _config("bad_teacher", lr=5.0, **SGD_ONE_BATCH),
                     seed=seed)
    sgd = [p - 5.0 * g for p, g in zip((w, b), grads_for(1)(w, b))]
    _assert_model(out.model, *sgd)
    rounded = [p - 5.0 * g for p, g in zip((w, b), grads_for(2)(w, b))]
    assert np.abs(rounded[0] - sgd[0]).max() > 1e-3
