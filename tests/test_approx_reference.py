"""Fisher masking, Twin MU and selective parameter reset against their reference code's rules.

Where a test transcribes a reference, the transcription keeps the reference's own loop structure
(its accumulators, its index bookkeeping), so it is a second, independent reading of the rule.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from approx_fixtures import fit_model, make_problem
from torch import nn

from approx import SubclassForget, loop, run_method
from approx.methods import fisher_masking as fm
from approx.methods import layer_reset as lr_
from approx.methods import twin_mu as tm
from sisa_ray.core.data import SampleSet
from sisa_ray.core.training import deterministic_torch, seeded
from sisa_ray.models import build_model

CPU = torch.device("cpu")


# --- Fisher masking: a transcription of Yufang-Liu/fisher_unlearning -------------------------

def reference_hessian(model, features, batch_size=128):
    """``unlearning/unlearn.py::hessian``: per batch, per class, prob-mean times squared gradient
    of the batch-mean loss; divided by the number of batches."""
    model.eval()
    loader = [torch.from_numpy(np.asarray(features[s:s + batch_size], dtype=np.float32))
              for s in range(0, len(features), batch_size)]
    for tp in model.parameters():
        tp.grad2_acc = 0
    for data in loader:
        output = model(data)
        prob = nn.functional.softmax(output, dim=-1).data
        for y in range(output.shape[1]):
            target = torch.empty(len(data), dtype=torch.long).fill_(y)
            loss = nn.CrossEntropyLoss()(output, target)
            model.zero_grad()
            loss.backward(retain_graph=True)
            for tp in model.parameters():
                tp.grad2_acc += prob[:, y].float().mean() * tp.grad.data.pow(2)
    out = [tp.grad2_acc / len(loader) for tp in model.parameters()]
    for tp in model.parameters():
        del tp.grad2_acc
    model.zero_grad()
    return out


def reference_named_layers(model, is_state_dict):
    """``get_named_layers`` for models with Conv2d and Linear layers (with biases)."""
    names, conv, linear = [], 0, 0
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            names += [f"Conv2d{conv}", f"Conv2d{conv}_bias"]
            conv += 1
        elif isinstance(mod, nn.Linear):
            names += [f"Linear{linear}", f"Linear{linear}_bias"]
            linear += 1
    return names


def reference_mask_fisher(model, forget, retain, remove_ratio):
    """``Unlearn.mask_fisher`` with ``largest=True``: the state dict after masking."""
    forget_grad = reference_hessian(model, forget)
    remain_grad = reference_hessian(model, retain)
    count_info = []
    for n, v1, v2 in zip(reference_named_layers(model, False), forget_grad, remain_grad):
        if n.startswith("Conv2d") and not n.endswith("bias"):
            activation = v1 - v2
            size = activation.size()[-1] * activation.size()[-2]
            count_info.append((torch.sum(torch.sum(activation, -1), -1) / size).view(-1).numpy())
        if n.startswith("Linear") and not n.endswith("bias"):
            count_info.append((v1 - v2).view(-1).numpy())
    count_info = np.concatenate(count_info)
    mask_index = np.argsort(count_info, kind="stable")
    mask_index = np.sort(mask_index[-int(len(count_info) * remove_ratio):])
    state_dict = copy.deepcopy(model.state_dict())
    num, idx = 0, 0
    for n, (k, v) in zip(reference_named_layers(model, True), state_dict.items()):
        if (n.startswith("Conv2d") or n.startswith("Linear")) and not n.endswith("bias"):
            while idx < len(mask_index) and mask_index[idx] < num + v.size()[0] * v.size()[1]:
                raw = (mask_index[idx] - num) // v.size()[1]
                col = (mask_index[idx] - num) % v.size()[1]
                state_dict[k][raw, col] = 0.0
                idx += 1
            num += v.size()[0] * v.size()[1]
    assert num == len(count_info)
    return state_dict


@pytest.fixture(scope="module")
def cnn_problem(digits):
    train, _, data = make_problem(digits, request=SubclassForget(label=3, fraction=0.5))
    model = build_model("cnn", train.input_shape, train.n_classes, hidden=16, seed=0)
    x, y, r = loop.stack((train, loop.RETAIN))
    cfg = loop.LoopConfig(epochs=8, lr=3e-3, optimizer="adam", weight_decay=0.0, batch_size=32)
    with deterministic_torch(1), seeded(0, CPU):
        loop.train(model, x, y, r, loop.cross_entropy, cfg, CPU, 0)
    return model.eval(), data


@pytest.fixture(scope="module")
def mlp_problem(digits):
    train, _, data = make_problem(digits, n_train=300)
    return fit_model(train), data


@pytest.mark.parametrize("which", ["cnn_problem", "mlp_problem"])
@pytest.mark.parametrize("ratio", [0.02, 0.1])
def test_fisher_masked_set_equals_the_reference_transcription(which, ratio, request):
    model, data = request.getfixturevalue(which)
    with deterministic_torch(1):
        expected = reference_mask_fisher(copy.deepcopy(model), data.forget.features,
                                         data.retain.features, ratio)
        work = copy.deepcopy(model)
        masks = fm.mask_model(work, data, fm.FisherMaskingConfig(mask_ratio=ratio), CPU)
    ours = work.state_dict()
    zeroed_ref = {k: (v == 0) & (model.state_dict()[k] != 0) for k, v in expected.items()}
    zeroed_ours = {k: (v == 0) & (model.state_dict()[k] != 0) for k, v in ours.items()}
    for k in expected:
        assert torch.equal(zeroed_ref[k], zeroed_ours[k]), k  # Jaccard overlap 1
        torch.testing.assert_close(ours[k], expected[k], rtol=0, atol=0)
    # biases are never masked; the masked units number int(ratio * N)
    assert all(not m.any() for k, m in zeroed_ours.items() if k.endswith("bias"))
    units = sum(p.shape[0] * p.shape[1] for k, p in model.state_dict().items()
                if k.endswith("weight"))
    kernels = sum(int(m.reshape(m.shape[0], m.shape[1], -1).all(-1).sum())
                  for m in masks.values())
    assert kernels == int(units * ratio)


def test_batch_fisher_by_hand_on_a_linear_model():
    """Two batches (3 rows and 1 row): each batch's squared mean gradient, weighted by the
    batch-mean probability of the class, then averaged over the two batches."""
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    x = np.array([[1.0, 2.0], [0.5, -1.0], [-1.0, 0.0], [2.0, 1.0]], dtype=np.float32)
    data = SampleSet(ids=np.arange(4), features=x, labels=np.zeros(4, dtype=np.int64), n_classes=3)
    w, b = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    fw, fb = np.zeros_like(w), np.zeros_like(b)
    for rows in (x[:3].astype(np.float64), x[3:].astype(np.float64)):
        z = rows @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        for c in range(3):
            g = (p - np.eye(3)[c]) / len(rows)  # d mean-CE / d logits
            fw += p[:, c].mean() * (g.T @ rows) ** 2
            fb += p[:, c].mean() * g.sum(0) ** 2
    got = fm.batch_fisher(model, data, CPU, batch_size=3)
    np.testing.assert_allclose(got["weight"].numpy(), fw / 2, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(got["bias"].numpy(), fb / 2, rtol=1e-5, atol=1e-8)


def test_fisher_mask_units_count_and_kernels():
    gen = torch.Generator().manual_seed(0)
    ff = {"lin": torch.rand(5, 4, generator=gen), "bias": torch.full((5,), 100.0),
          "conv": torch.rand(3, 2, 3, 3, generator=gen)}
    fr = {k: torch.zeros_like(v) for k, v in ff.items()}
    ff["conv"][1, 0] = 5.0  # the best kernel by its spatial mean
    ff["conv"][2, 1, 0, 0] = 9.0  # the largest entry, but its kernel's mean is under 2
    ff["lin"][3, 2] = 3.0  # the second unit
    masks = fm.fisher_mask(ff, fr, 0.1)  # N = 20 + 6 units -> int(2.6) = 2
    assert not masks["bias"].any()
    assert masks["conv"][1, 0].all() and int(masks["conv"].sum()) == 9
    assert int(masks["lin"].sum()) == 1 and masks["lin"][3, 2]
    assert sum(int(m.sum()) for m in fm.fisher_mask(ff, fr, 0.03).values()) == 0  # int(0.78)


def test_fisher_masking_repairs_on_the_whole_retain_set(monkeypatch, mlp_problem):
    model, data = mlp_problem
    seen = {}

    def spy(model, x, y, r, loss, cfg, device, seed):
        seen["n"], seen["cfg"] = len(y), cfg
        return model

    monkeypatch.setattr(fm, "train", spy)
    run_method("fisher_masking", model, data, fm.FisherMaskingConfig(epochs=1))
    assert seen["n"] == len(data.retain)
    assert (seen["cfg"].batch_size, seen["cfg"].lr, seen["cfg"].momentum,
            seen["cfg"].weight_decay) == (128, 0.1, 0.9, 1e-4)


# --- Twin MU: rules of abc321123444/TWIN-unlearning where the paper is silent ----------------

SMALL_TWIN = dict(twin_epochs=2, curriculum_epochs=1, classifier_epochs=5, epochs=1)


def test_twin_forget_set_keeps_the_forget_ratio(mlp_problem):
    _, data = mlp_problem
    full, rng = data.full(), np.random.default_rng(0)
    n, m = len(full), len(data.forget)  # 300, 30
    twin_train, twin_forget = tm.twin_problem(full, data.forget, data.extra, data.request, rng)
    assert len(twin_forget) == round(m * n / (n - m)) == 33 and len(twin_train) == n
    assert not set(twin_forget.ids) & set(full.ids)
    short = data.extra.take(np.arange(10))  # too few: all 10, and 90 training rows beside them
    twin_train, twin_forget = tm.twin_problem(full, data.forget, short, data.request, rng)
    assert (len(twin_forget), len(twin_train)) == (10, 90)
    assert len(twin_forget) / (len(twin_forget) + len(twin_train)) == pytest.approx(m / n)
    sub = SubclassForget(label=3, fraction=0.5)
    _, twin_forget = tm.twin_problem(full, data.forget, data.extra, sub, rng)
    assert set(twin_forget.labels) == {3}


def test_adversarial_feature_uses_the_clean_logits_as_soft_target():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]]))
        model.bias.copy_(torch.tensor([0.2, -0.1]))
    x = np.array([[0.5, 0.1, -0.3], [1.0, 1.0, 1.0]], dtype=np.float32)
    y = np.array([0, 1])
    s = SampleSet(ids=np.arange(2), features=x, labels=y, n_classes=2)
    w, b = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    eps = 0.3
    z = x.astype(np.float64) @ w.T + b
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    grad_x = (p - np.eye(2)[y]) @ w  # d CE / dx, per row (the batch mean only rescales)
    adv = x + eps / 3 * np.sign(grad_x)  # one PGD step, inside the eps ball
    za = adv @ w.T + b
    log_pa = za - np.log(np.exp(za).sum(1, keepdims=True))
    expected = -(z * log_pa).sum(1)
    np.testing.assert_allclose(tm.adversarial_feature(model, s, eps, 1, CPU), expected, rtol=1e-5)
    # a probability target would give another value on the same numbers
    assert not np.allclose(expected, -(p * log_pa).sum(1), rtol=1e-3)


def test_scale_features_clips_at_1_5_iqr_then_min_max():
    f = np.array([[0.0, 5.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [100.0, 5.0]])
    # quartiles 1 and 3: upper bound 3 + 1.5 * 2 = 6; a constant column scales to 0
    np.testing.assert_allclose(tm.scale_features(f)[:, 0], [0, 1 / 6, 2 / 6, 3 / 6, 1])
    np.testing.assert_allclose(tm.scale_features(f)[:, 1], 0.0)


def test_generalization_labels_easy_where_the_model_is_right(mlp_problem):
    model, data = mlp_problem
    with torch.no_grad():
        pred = model(torch.from_numpy(data.extra.features.astype(np.float32))).argmax(1).numpy()
    easy = tm.generalization_labels(model, data.extra, CPU)
    assert 0 < easy.sum() < len(easy)
    np.testing.assert_array_equal(easy == tm.EASY, pred == data.extra.labels)


def test_predict_easy_reads_the_classifier_output_as_the_probability_of_easy():
    """The code's convention (``evalb``): sigmoid > 0.5 is EASY. A classifier whose logit is
    +3 for the first sample and -3 for the second calls them easy and hard."""

    class Fixed(nn.Module):
        def forward(self, x):
            return x[:, :1]

    f = np.array([[3.0, 0.0], [-3.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(tm.predict_easy(Fixed(), f), [tm.EASY, tm.HARD])


def test_unlearning_labels_change_the_hard_samples_only():
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    easy = np.array([1, 0, 1, 0, 0, 1, 0, 1])
    out = tm.unlearning_labels(labels, easy, 10, np.random.default_rng(0))
    assert (out[easy == tm.EASY] == labels[easy == tm.EASY]).all()
    assert (out[easy == tm.HARD] != labels[easy == tm.HARD]).all()
    assert out.min() >= 0 and out.max() < 10


def test_twin_mu_pipeline_follows_the_reference(monkeypatch, mlp_problem):
    model, data = mlp_problem
    calls, seen = [], {}
    real_train, real_clf, real_predict = tm.train, tm.train_classifier, tm.predict_easy

    def spy_train(m, x, y, r, loss, cfg, device, seed):
        calls.append({"x": x.copy(), "y": y.copy(), "r": r.copy(),
                      "fresh": not torch.equal(m.net[1].weight, model.net[1].weight)})
        return real_train(m, x, y, r, loss, cfg, device, seed)

    def spy_clf(f, easy, config, seed):
        seen["twin_f"], seen["twin_easy"] = f, easy
        return real_clf(f, easy, config, seed)

    def fixed_predict(clf, f):
        seen["real_f"] = f
        real_predict(clf, f)
        return np.arange(len(f)) % 2  # every other sample easy

    monkeypatch.setattr(tm, "train", spy_train)
    monkeypatch.setattr(tm, "train_classifier", spy_clf)
    monkeypatch.setattr(tm, "predict_easy", fixed_predict)
    cfg = tm.TwinMUConfig(**SMALL_TWIN)
    assert cfg.features == ("distance", "curriculum")  # the code's default pair
    run_method("twin_mu", model, data, cfg, seed=0)
    twin_call, curriculum_call, unlearn_call = calls
    full = data.full()
    # the twin model trains on the training set plus the twin forget set
    assert len(twin_call["y"]) == len(full) + (twin_call["r"] == 1).sum()
    # the curriculum model starts afresh and sees the original training set only
    assert curriculum_call["fresh"] and len(curriculum_call["y"]) == len(full)
    np.testing.assert_array_equal(np.sort(curriculum_call["y"]), np.sort(full.labels))
    # generalization labels of the twin forget set: the original model's correctness
    twin_x = twin_call["x"][twin_call["r"] == 1]
    with torch.no_grad():
        pred = model(torch.from_numpy(twin_x)).argmax(1).numpy()
    np.testing.assert_array_equal(seen["twin_easy"] == tm.EASY,
                                  pred == twin_call["y"][twin_call["r"] == 1])
    # twin and real features are each scaled on their own: both span [0, 1] per column
    for f in (seen["twin_f"], seen["real_f"]):
        assert f.shape[1] == 2
        np.testing.assert_allclose(f.min(0), 0.0)
        np.testing.assert_allclose(f.max(0), 1.0)
    # unlearning: retain as is, easy forget samples keep their label, hard ones lose it
    forget_rows = unlearn_call["r"] == 1
    np.testing.assert_array_equal(unlearn_call["y"][~forget_rows], data.retain.labels)
    got = unlearn_call["y"][forget_rows]
    easy = np.arange(len(data.forget)) % 2 == 1
    np.testing.assert_array_equal(got[easy], data.forget.labels[easy])
    assert (got[~easy] != data.forget.labels[~easy]).all()


# --- Selective parameter reset with fine-tuning (NeurIPS 2023 challenge, 6th place) ----------

def test_reset_touches_the_first_and_last_layers_only(mlp_problem):
    model, _ = mlp_problem
    work = copy.deepcopy(model)
    with seeded(5, CPU):
        names = lr_.reset_layers(work)
    assert names == ["net.1", "net.5"]  # the MLP's first and last Linear layers
    before, after = model.state_dict(), work.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == (k.split(".weight")[0].split(".bias")[0] in names), k


def test_layer_reset_phases(monkeypatch, mlp_problem):
    """Before any training step only the reset layers differ from the original; the warm-up
    trains on the validation set against the original's outputs, then the retain phase."""
    model, data = mlp_problem
    calls = []

    def spy(m, x, y, r, loss, cfg, device, seed):
        before = {k: v.clone() for k, v in m.state_dict().items()}
        calls.append({"n": len(y), "cfg": cfg, "before": before, "loss": loss,
                      "x": torch.from_numpy(x[:8]), "y": torch.from_numpy(y[:8])})
        return m

    monkeypatch.setattr(lr_, "train", spy)
    run_method("layer_reset", model, data, lr_.LayerResetConfig(), seed=1)
    warm, tune = calls
    assert warm["n"] == len(data.validation) and tune["n"] == len(data.retain)
    assert (warm["cfg"].epochs, warm["cfg"].lr, tune["cfg"].epochs, tune["cfg"].lr) == \
        (3, 9e-4, 3, 1e-3)
    assert tune["cfg"].schedule == "cosine_epoch" and tune["cfg"].batch_size == 64
    orig = model.state_dict()
    differs = {k for k in orig if not torch.equal(orig[k], warm["before"][k])}
    assert differs == {"net.1.weight", "net.1.bias", "net.5.weight", "net.5.bias"}
    # the warm-up loss is the KL to the original at T = 5; the retain loss adds CE and soft CE
    student = copy.deepcopy(model)
    student.load_state_dict(warm["before"])
    with torch.no_grad():
        z, zt = student(warm["x"]), model(warm["x"])
    q = torch.softmax(zt.double() / 5, 1)
    log_p = torch.log_softmax(z.double() / 5, 1)
    kl = (q * (q.log() - log_p)).sum(1).mean()
    soft = -(q * log_p).sum(1).mean()
    ce = nn.functional.cross_entropy(z.double(), warm["y"])
    with torch.no_grad():
        assert warm["loss"](student, warm["x"], warm["y"], None).item() == \
            pytest.approx(kl.item(), rel=1e-5)
        assert tune["loss"](student, warm["x"], warm["y"], None).item() == \
            pytest.approx((ce + soft + kl).item(), rel=1e-5)


def test_retain_loss_by_hand_on_a_tiny_batch():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.5]])
    zt = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    y = torch.tensor([0, 2])
    t = 2.0

    def sm(v):
        e = [math.exp(a / t) for a in v]
        return [a / sum(e) for a in e]

    ce = kl = soft = 0.0
    for zi, zti, yi in zip(z.tolist(), zt.tolist(), y.tolist()):
        ce += -math.log(math.exp(zi[yi]) / sum(math.exp(a) for a in zi)) / 2
        p, q = sm(zi), sm(zti)
        soft += -sum(qc * math.log(pc) for qc, pc in zip(q, p)) / 2
        kl += sum(qc * math.log(qc / pc) for qc, pc in zip(q, p)) / 2
    assert lr_.soft_cross_entropy(z, zt, t).item() == pytest.approx(soft, rel=1e-6)
    assert lr_.distillation_kl(z, zt, t).item() == pytest.approx(kl, rel=1e-6)
    assert lr_.retain_loss(z, zt, y, t).item() == pytest.approx(ce + soft + kl, rel=1e-6)


def test_per_epoch_cosine_schedule(monkeypatch):
    """``cosine_epoch``: the rate is constant within an epoch, lr * (1 + cos(pi e / E)) / 2."""
    made, rates = [], []
    real = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda m, cfg: made.append(real(m, cfg)) or made[-1])

    def record(m, x, y, r):
        rates.append(made[0].param_groups[0]["lr"])
        return nn.functional.cross_entropy(m(x), y)

    x, y = np.zeros((8, 2), dtype=np.float32), np.zeros(8, dtype=np.int64)
    cfg = loop.LoopConfig(epochs=3, lr=1.0, batch_size=4, schedule="cosine_epoch")
    loop.train(nn.Linear(2, 2), x, y, np.zeros(8), record, cfg, CPU, 0)
    expected = [(1 + math.cos(math.pi * e / 3)) / 2 for e in range(3) for _ in range(2)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
