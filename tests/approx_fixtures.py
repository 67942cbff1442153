"""A small memorising classifier on digits and its unlearning data, shared by approx tests."""

from __future__ import annotations

import numpy as np
import torch

from approx import RandomForget, UnlearningData, split_forget
from approx.loop import RETAIN, LoopConfig, cross_entropy, stack, train
from sisa_ray.core.training import deterministic_torch, seeded
from sisa_ray.models import build_model


def fit_model(data, epochs=40, seed=0, hidden=32):
    model = build_model("mlp", data.input_shape, data.n_classes, hidden=hidden, seed=seed)
    x, y, r = stack((data, RETAIN))
    cfg = LoopConfig(epochs=epochs, lr=3e-3, optimizer="adam", weight_decay=0.0, batch_size=32)
    with deterministic_torch(1), seeded(seed, torch.device("cpu")):
        train(model, x, y, r, cross_entropy, cfg, torch.device("cpu"), seed)
    return model.eval()


def make_problem(digits, n_train=240, n_extra=60, n_test=120, request=None):
    train_all, test_all = digits
    train = train_all.take(np.arange(n_train))
    extra = train_all.take(np.arange(n_train, n_train + n_extra))
    test = test_all.take(np.arange(n_test))
    request = request or RandomForget(fraction=0.1)
    forget, retain = split_forget(train, request, seed=0)
    data = UnlearningData(forget=forget, retain=retain, request=request, validation=test,
                          extra=extra)
    return train, test, data
