"""The SISA cost model: expected retraining cost of deletions, in sample-steps.

A shard of ``n`` samples in ``R`` slices trains at step ``r`` on ``(r+1)/R * n`` samples for
``e_r`` epochs. A deleted sample sits in a uniformly random shard and slice. Deleting it retrains
steps ``k..R-1`` of its shard, ``k`` being its slice; several deletions in one shard restart from the
smallest of their slices. Speedups are against retraining from scratch, whose cost is
``sum_r (r+1)/R * n * e_r`` per shard, i.e. the whole ensemble (or one model of the same
total sample-steps).

With the SISA schedule ``e_r = 2E/(R+1)`` one deletion costs ``n E (2R+1) / (3R)`` on average and
the speedup is the paper's ``S * 3R / (2R + 1)`` (Bourtoule et al. 2021, Section V).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def paper_speedup(n_shards: int, n_slices: int) -> float:
    """Bourtoule et al.'s expected speedup of one deletion: ``S * 3R / (2R + 1)``."""
    return n_shards * 3 * n_slices / (2 * n_slices + 1)


def _step_costs(epochs: Sequence[float]) -> list[float]:
    r_total = len(epochs)
    return [(r + 1) / r_total * e for r, e in enumerate(epochs)]


def expected_shard_cost(epochs: Sequence[float], deletions_in_shard: int) -> float:
    """Expected retraining cost (in passes over the shard) given ``j >= 1`` deletions in it."""
    r_total = len(epochs)
    costs = _step_costs(epochs)
    # step r is retrained iff min slice <= r: probability 1 - ((R - 1 - r) / R) ** j
    return sum(c * (1 - ((r_total - 1 - r) / r_total) ** deletions_in_shard)
               for r, c in enumerate(costs))


def expected_speedup(n_shards: int, epochs: Sequence[float], requests: int = 1,
                     batched: bool = False) -> float:
    """Expected sample-step speedup of exact deletion over retraining from scratch.

    ``batched=False``: each of the ``requests`` single-id requests is served alone (and would each
    need a full retrain naively): the per-request speedup. ``batched=True``: ``requests`` ids in one
    request against one full retrain; ids land in shards as Binomial(K, 1/S).
    """
    full = sum(_step_costs(epochs))  # per shard, in passes over the shard
    if not batched or requests == 1:
        return n_shards * full / expected_shard_cost(epochs, 1)
    k, s = requests, n_shards
    if s == 1:
        return full / expected_shard_cost(epochs, k)
    per_shard = 0.0
    for j in range(1, k + 1):  # P(j of the K ids in a given shard), in log space
        log_p = (math.lgamma(k + 1) - math.lgamma(j + 1) - math.lgamma(k - j + 1)
                 + j * math.log(1 / s) + (k - j) * math.log(1 - 1 / s))
        per_shard += math.exp(log_p) * expected_shard_cost(epochs, j)
    return full / per_shard  # S shards each cost per_shard in expectation, vs S * full


def expected_shards_touched(n_shards: int, requests: int) -> float:
    """Expected number of distinct shards ``requests`` uniform deletions touch."""
    return n_shards * (1 - (1 - 1 / n_shards) ** requests)
