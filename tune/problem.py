"""The comparison problem: data, original and gold models per seed, and how a method is applied.

Two targets:

* ``monolith``: one model trained on all training data; the gold is a retrain without the forget
  set. Methods unlearn the model.
* ``sisa``: a SISA ensemble; the gold is the exact SISA deletion of the same ids (bit-identical
  to retraining the ensemble). Methods unlearn each affected shard model with that shard's forget
  and retain data; untouched shards stay as they are.

Ensembles are scored through their soft vote (mean probability), so losses, MIA and divergences
are defined for them as for a single model. Pure: no Ray, no MLflow here; the Ray edge ships a
``Problem`` to trials through the object store.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from approx import UnlearningData, run_method
from approx.loop import RETAIN, LoopConfig, cross_entropy, on_epoch_end, stack, train
from approx.metrics import Evaluation, evaluate, logit_scaled_confidence, logits
from approx.requests import ForgetRequest
from sisa_ray.core.config import ShardingConfig, SISAConfig, TrainingConfig
from sisa_ray.core.data import SampleSet
from sisa_ray.core.plan import assign
from sisa_ray.core.training import deterministic_torch, seeded
from sisa_ray.models import build_model

from .config import TARGETS

__all__ = ["TARGETS", "ModelSpec", "Problem", "apply_method", "score", "train_seed"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, ...]
    n_classes: int
    hidden: int = 128

    def build(self, state: dict | None = None, seed: int = 0) -> nn.Module:
        model = build_model(self.name, self.input_shape, self.n_classes, hidden=self.hidden,
                            seed=seed)
        if state is not None:
            model.load_state_dict(state)
        return model.eval()


class SoftVote(nn.Module):
    """A SISA ensemble as one module: log of the mean softmax of the voting shards; for
    regression the mean of their outputs."""

    def __init__(self, shards: list[nn.Module | None], regression: bool = False) -> None:
        super().__init__()
        self.shards = nn.ModuleList([m for m in shards if m is not None])
        self.regression = regression
        if not len(self.shards):
            raise ValueError("Every shard abstains: the ensemble cannot predict.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.regression:
            return torch.stack([m(x) for m in self.shards]).mean(0)
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in self.shards]).mean(0)
        return torch.log(probs.clamp_min(1e-30))


@dataclass
class Trained:
    """One seed's models: a state dict (monolith) or one per shard, None for abstaining."""

    original: dict | list[dict | None]
    gold: dict | list[dict | None]
    gold_seconds: float  # monolith: retrain; sisa: exact deletion
    retrain_seconds: float  # naive retrain (of the ensemble, for sisa)
    exact_seconds: float = float("nan")  # monolith: exact SISA deletion time
    exact: list[dict | None] | None = None  # monolith: the exactly unlearned SISA ensemble
    # the naive retrain, from seeds of its own (RETRAIN_SEED_OFFSET): scored against the gold it
    # is a sample of the retrained distribution, so its forgetting quality is the ceiling an
    # unlearning method can reach with this many seeds (the gold scored against itself gives 1)
    retrain: dict | list[dict | None] | None = None


@dataclass
class Problem:
    target: str
    spec: ModelSpec
    request: ForgetRequest
    forget: SampleSet
    retain: SampleSet
    test: SampleSet
    extra: SampleSet | None
    sisa: SISAConfig
    seeds: list[Trained] = field(default_factory=list)

    def unlearning_data(self) -> UnlearningData:
        return UnlearningData(forget=self.forget, retain=self.retain, request=self.request,
                              validation=self.validation, extra=self.extra)

    @property
    def validation(self) -> SampleSet | None:
        """The methods' validation split: the held-out ``extra`` samples, trained on by no model
        and scored by no metric (the challenge's validation split is such held-out data; the
        test split is where ``test_acc`` is measured, so no method may learn from it)."""
        return self.extra

    def model(self, states) -> nn.Module:
        if isinstance(states, dict):
            return self.spec.build(states)
        return SoftVote([None if s is None else self.spec.build(s) for s in states],
                        regression=self.retain.task == "regression")

    def shard_split(self) -> dict[int, tuple[SampleSet, SampleSet]]:
        """Forget and retain data of every shard the forget set touches."""
        f_shard, _ = assign(self.forget.ids, self.sisa.sharding)
        r_shard, _ = assign(self.retain.ids, self.sisa.sharding)
        return {
            int(s): (self.forget.take(f_shard == s), self.retain.take(r_shard == s))
            for s in np.unique(f_shard)
        }


def train_monolith(data: SampleSet, spec: ModelSpec, training: TrainingConfig, seed: int):
    """One model on ``data``: Adam, the training config's epochs, lr and batch size."""
    model = spec.build(seed=seed)
    x, y, r = stack((data, RETAIN))
    cfg = LoopConfig(epochs=training.epochs, lr=training.lr, optimizer=training.optimizer,
                     weight_decay=training.weight_decay, batch_size=training.batch_size)
    t0 = time.perf_counter()
    with deterministic_torch(1), seeded(seed, torch.device("cpu")):
        train(model, x, y, r, cross_entropy, cfg, torch.device("cpu"), seed)
    return model.eval().state_dict(), time.perf_counter() - t0


RETRAIN_SEED_OFFSET = 1_000_003  # the naive retrain's seeds never meet the gold's


def train_sisa(train_set: SampleSet, forget_ids: np.ndarray, config: SISAConfig):
    """Fit a SISA ensemble in-process, then delete ``forget_ids`` exactly; and fit a naive
    retrain of the ensemble on the remaining data from an independent sharding seed.

    Returns ``(original shard states, exact shard states, exact deletion seconds, retrain shard
    states, retrain seconds)``; abstaining shards are None.
    """
    from sisa_ray.ensemble import SISAEnsemble

    with tempfile.TemporaryDirectory(prefix="sisa-compare-") as tmp:
        ens = SISAEnsemble(config, store=f"{tmp}/s", backend="local").fit(train_set)
        original = _shard_states(ens)
        t0 = time.perf_counter()
        ens.unlearn(np.asarray(forget_ids).tolist())
        exact_s = time.perf_counter() - t0
        exact = _shard_states(ens)
        other = SISAConfig(sharding=ShardingConfig(
            n_shards=config.sharding.n_shards, n_slices=config.sharding.n_slices,
            seed=config.sharding.seed + RETRAIN_SEED_OFFSET), training=config.training)
        retrain = SISAEnsemble(other, store=f"{tmp}/r", backend="local")
        t0 = time.perf_counter()
        retrain.fit(train_set.without_ids(forget_ids))
        retrain_s = time.perf_counter() - t0
        retrained = _shard_states(retrain)
    return original, exact, exact_s, retrained, retrain_s


def _shard_states(ens) -> list[dict | None]:
    states = ens.shard_states()
    return [None if e.n_samples == 0 else s for e, s in zip(ens.manifest_.shards, states)]


def train_seed(problem: Problem, train_set: SampleSet, seed: int) -> Trained:
    """Original, gold and exact models for one seed (the unit of parallel work)."""
    torch.set_num_threads(1)
    sisa = SISAConfig(
        sharding=ShardingConfig(n_shards=problem.sisa.sharding.n_shards,
                                n_slices=problem.sisa.sharding.n_slices, seed=seed),
        training=problem.sisa.training,
    )
    original_e, exact_e, exact_s, retrain_e, retrain_e_s = train_sisa(
        train_set, problem.forget.ids, sisa)
    if problem.target == "sisa":
        return Trained(original=original_e, gold=exact_e, gold_seconds=exact_s,
                       retrain_seconds=retrain_e_s, exact_seconds=exact_s, exact=exact_e,
                       retrain=retrain_e)
    training = problem.sisa.training
    original, _ = train_monolith(train_set, problem.spec, training, seed)
    gold, gold_s = train_monolith(problem.retain, problem.spec, training, seed)
    retrain, retrain_s = train_monolith(problem.retain, problem.spec, training,
                                        seed + RETRAIN_SEED_OFFSET)
    return Trained(original=original, gold=gold, gold_seconds=gold_s, retrain_seconds=retrain_s,
                   exact_seconds=exact_s, exact=exact_e, retrain=retrain)


def apply_method(problem: Problem, method: str, config, seed: int, seed_index: int = 0,
                 device: str = "cpu", epoch_end: Callable[[nn.Module, int], None] | None = None,
                 threads: int = 1):
    """Unlearn with ``method``; return ``(model on the CPU, seconds)``. ``seed_index`` picks the
    original; ``epoch_end(model, epoch)`` observes every epoch of a method that trains (monolith
    target only: a SISA target unlearns shard after shard, and one shard is not the model)."""
    trained = problem.seeds[seed_index]
    if problem.target == "monolith":
        observe = None if epoch_end is None else _on_cpu(epoch_end)
        with on_epoch_end(observe):
            res = run_method(method, problem.model(trained.original), problem.unlearning_data(),
                             config, seed=seed, threads=threads, device=device)
        return res.model.to("cpu").eval(), res.seconds
    shards = [None if s is None else problem.spec.build(s) for s in trained.original]
    seconds = 0.0
    sharding = SISAConfig(
        sharding=ShardingConfig(n_shards=problem.sisa.sharding.n_shards,
                                n_slices=problem.sisa.sharding.n_slices, seed=seed_index),
        training=problem.sisa.training,
    )
    view = Problem(problem.target, problem.spec, problem.request, problem.forget,
                   problem.retain, problem.test, problem.extra, sharding)
    for s, (f_s, r_s) in view.shard_split().items():
        if len(r_s) == 0:
            shards[s] = None  # nothing left to learn from: the shard abstains, as exactly
            continue
        data = UnlearningData(forget=f_s, retain=r_s, request=problem.request,
                              validation=problem.validation, extra=problem.extra)
        res = run_method(method, shards[s], data, config, seed=seed, threads=threads, device=device)
        shards[s], seconds = res.model.to("cpu"), seconds + res.seconds
    return SoftVote(shards, regression=problem.retain.task == "regression").eval(), seconds


def _on_cpu(hook: Callable[[nn.Module, int], None]) -> Callable[[nn.Module, int], None]:
    """The observer sees a CPU copy of a model that trains on another device (scoring runs on
    the CPU, and the training model must not move under its optimiser)."""

    def observe(model: nn.Module, epoch: int) -> None:
        on_cpu = next(model.parameters()).device.type == "cpu"
        hook(model if on_cpu else copy.deepcopy(model).to("cpu"), epoch)

    return observe


def score(problem: Problem, model: nn.Module, seconds: float, seed_index: int = 0,
          gold_eval: Evaluation | None = None) -> Evaluation:
    trained = problem.seeds[seed_index]
    gold = problem.model(trained.gold)
    if gold_eval is None:
        gold_eval = evaluate(gold, problem.forget, problem.retain, problem.test,
                             seconds=trained.retrain_seconds, seed=seed_index)
    return evaluate(model, problem.forget, problem.retain, problem.test, seconds=seconds,
                    gold=gold, gold_eval=gold_eval, seed=seed_index,
                    incompetent=problem.spec.build(seed=seed_index))


def forget_margins(problem: Problem, model: nn.Module) -> np.ndarray:
    """The statistic the forgetting-quality attacks see per forget sample: the challenge's
    ``log p_y - log(1 - p_y)``, or for regression the negative absolute error."""
    z = logits(model, problem.forget)
    if problem.forget.task == "regression":
        return -np.abs(z[:, 0] - problem.forget.labels)
    return logit_scaled_confidence(z, problem.forget.labels)
