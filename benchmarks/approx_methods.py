"""Every approximate method against the gold model on one forget request (no Ray, no MLflow).

    .venv/bin/python benchmarks/approx_methods.py --dataset digits --forget random:0.1
    .venv/bin/python benchmarks/approx_methods.py --dataset digits --forget class:3

A model is trained on the full training set (the original), another on the retain set only (the
gold); each method unlearns a copy of the original and is scored against the gold.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from approx import UnlearningData, get_method, list_methods, parse_request, run_method, split_forget
from approx.loop import RETAIN, LoopConfig, cross_entropy, stack, train
from approx.metrics import evaluate
from sisa_ray.core.training import deterministic_torch, seeded
from sisa_ray.datasets import load_dataset
from sisa_ray.models import build_model


def fit(data, model_name: str, epochs: int, seed: int):
    model = build_model(model_name, data.input_shape, data.n_classes, hidden=128, seed=seed)
    x, y, r = stack((data, RETAIN))
    cfg = LoopConfig(epochs=epochs, lr=1e-3, optimizer="adam", weight_decay=0.0, batch_size=32)
    t0 = time.perf_counter()
    with deterministic_torch(torch.get_num_threads()), seeded(seed, torch.device("cpu")):
        train(model, x, y, r, cross_entropy, cfg, torch.device("cpu"), seed)
    return model.eval(), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--forget", default="random:0.1")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--methods", default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    train_all, test = load_dataset(args.dataset)
    request = parse_request(args.forget)
    # hold out 10% of the training split as "extra" data (Twin MU's twin problem)
    rng = np.random.default_rng(args.seed)
    extra_ids = rng.choice(train_all.ids, size=len(train_all) // 10, replace=False)
    train_set, extra = train_all.without_ids(extra_ids), train_all.select_ids(extra_ids)
    forget, retain = split_forget(train_set, request, args.seed)
    data = UnlearningData(forget=forget, retain=retain, request=request, validation=test,
                          extra=extra)
    original, t_orig = fit(train_set, args.model, args.epochs, args.seed)
    gold, t_gold = fit(retain, args.model, args.epochs, args.seed)
    g = evaluate(gold, forget, retain, test, seconds=t_gold, seed=args.seed)
    rows = [("gold (retrain)", g.to_dict()),
            ("original", evaluate(original, forget, retain, test, seconds=0.0, gold=gold,
                                  gold_eval=g, seed=args.seed).to_dict())]
    names = list_methods() if args.methods == "all" else args.methods.split(",")
    for name in names:
        if request.kind not in get_method(name).kinds:
            print(f"{name}: skipped ({request.kind} requests not supported)")
            continue
        res = run_method(name, original, data, seed=args.seed)
        ev = evaluate(res.model, forget, retain, test, seconds=res.seconds, gold=gold,
                      gold_eval=g, seed=args.seed)
        rows.append((name, ev.to_dict()))
        print(f"{name}: forget {ev.forget_acc:.3f} retain {ev.retain_acc:.3f} "
              f"test {ev.test_acc:.3f} MIA {ev.mia:.3f} time {ev.seconds:.2f}s", flush=True)

    print(f"\n{args.dataset}, {request}, {len(forget)} forget / {len(retain)} retain / "
          f"{len(test)} test; gold retrain {t_gold:.1f}s\n")
    head = "| method | forget acc | retain acc | test acc | MIA | act. dist | JS | time s | time/gold |"
    print(head)
    print("|" + "---|" * 9)
    for name, d in rows:
        print(f"| {name} | {d['forget_acc']:.3f} | {d['retain_acc']:.3f} | {d['test_acc']:.3f} | "
              f"{d['mia']:.3f} | {d['activation_distance']:.3f} | {d['js_divergence']:.4f} | "
              f"{d['seconds']:.2f} | {d['time_ratio']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"request": str(request), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
