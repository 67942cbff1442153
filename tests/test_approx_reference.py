"""Fisher masking, Twin MU and selective parameter reset against their reference code's rules.

Where a test transcribes a reference, the transcription keeps the reference's own loop structure
(its accumulators, its index bookkeeping), so it is a second, independent reading of the rule.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from approx_fixtures import fit_model, make_problem
from torch import nn

from approx import SubclassForget, run_method
from approx.methods import fisher_masking as fm
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
    from approx.loop import RETAIN, LoopConfig, cross_entropy, stack
    from approx.loop import train as fit

    x, y, r = stack((train, RETAIN))
    cfg = LoopConfig(epochs=8, lr=3e-3, optimizer="adam", weight_decay=0.0, batch_size=32)
    with deterministic_torch(1), seeded(0, CPU):
        fit(model, x, y, r, cross_entropy, cfg, CPU, 0)
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
