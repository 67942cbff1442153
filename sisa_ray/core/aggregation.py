"""Aggregation of shard outputs: majority vote (default) or soft vote.

Tie rule of the majority vote: when several classes get the same, highest number of votes, the
**smallest class index** among them wins. It is simple, deterministic and independent of shard
order. A shard with no training samples abstains from both votes.
"""

from __future__ import annotations

import numpy as np

VOTES = ("hard", "soft")
REGRESSION_AGGREGATES = ("mean", "median")


def _active(shard_probs: np.ndarray, active: np.ndarray | None) -> np.ndarray:
    probs = np.asarray(shard_probs, dtype=np.float64)
    if probs.ndim != 3:
        raise ValueError(
            f"shard_probs must have shape (n_shards, n_samples, n_classes). Got {probs.shape}."
        )
    if active is None:
        return probs
    active = np.asarray(active, dtype=bool)
    if not active.any():
        raise ValueError(
            "Every shard abstains: no shard has training samples left, so the ensemble cannot "
            "predict. Train on more data."
        )
    return probs[active]


def vote_counts(shard_probs: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    """Votes per class, shape (n_samples, n_classes): each active shard votes for its argmax."""
    probs = _active(shard_probs, active)
    n_classes = probs.shape[2]
    picks = probs.argmax(axis=2)  # (S, N)
    counts = np.zeros((probs.shape[1], n_classes), dtype=np.int64)
    for shard_picks in picks:
        counts[np.arange(probs.shape[1]), shard_picks] += 1
    return counts


def majority_vote(shard_probs: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    """Class with the most shard votes; ties go to the smallest class index."""
    return vote_counts(shard_probs, active).argmax(axis=1)  # argmax returns the first maximum


def soft_vote_proba(shard_probs: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    """Mean probability over active shards, shape (n_samples, n_classes)."""
    return _active(shard_probs, active).mean(axis=0)


def aggregate(
    shard_probs: np.ndarray, active: np.ndarray | None = None, vote: str = "hard"
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(prediction, aggregated probabilities)``.

    For ``vote="hard"`` the probabilities are the vote shares; for ``"soft"`` the mean probability.
    """
    if vote not in VOTES:
        raise ValueError(f"The 'vote' parameter must be one of {list(VOTES)}. Got {vote!r}.")
    if vote == "hard":
        counts = vote_counts(shard_probs, active)
        return counts.argmax(axis=1), counts / counts.sum(axis=1, keepdims=True)
    proba = soft_vote_proba(shard_probs, active)
    return proba.argmax(axis=1), proba


def aggregate_regression(
    shard_outputs: np.ndarray, active: np.ndarray | None = None, how: str = "mean"
) -> np.ndarray:
    """Regression: the mean (default) or median of the active shards' predictions.

    ``shard_outputs`` has shape (n_shards, n_samples) or (n_shards, n_samples, 1).
    """
    if how not in REGRESSION_AGGREGATES:
        raise ValueError(f"The regression aggregate must be one of {list(REGRESSION_AGGREGATES)}."
                         f" Got {how!r}.")
    out = np.asarray(shard_outputs, dtype=np.float64)
    if out.ndim == 3:
        out = out[..., 0]
    out = _active(out[..., None], active)[..., 0]
    return out.mean(axis=0) if how == "mean" else np.median(out, axis=0)
