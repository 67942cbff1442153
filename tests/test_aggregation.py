import numpy as np
import pytest

from sisa_ray.core.aggregation import aggregate, majority_vote, soft_vote_proba


def onehot(*classes, n=3):
    return np.eye(n)[list(classes)][:, None, :]  # (S, 1, C)


def test_majority_vote_tie_goes_to_smallest_class():
    assert majority_vote(onehot(2, 1)).tolist() == [1]
    assert majority_vote(onehot(2, 2, 0, 0, 1)).tolist() == [0]


def test_majority_beats_confidence():
    probs = np.array([[[0.9, 0.1]], [[0.4, 0.6]], [[0.45, 0.55]]])
    assert majority_vote(probs).tolist() == [1]
    assert soft_vote_proba(probs).argmax(1).tolist() == [0]


def test_abstaining_shard_has_no_vote():
    probs = onehot(0, 1, 1)
    assert majority_vote(probs).tolist() == [1]
    assert majority_vote(probs, active=np.array([True, True, False])).tolist() == [0]
    with pytest.raises(ValueError, match="Every shard abstains"):
        majority_vote(probs, active=np.zeros(3, bool))


def test_aggregate_returns_vote_shares_and_mean():
    probs = np.array([[[0.2, 0.8]], [[0.6, 0.4]], [[0.1, 0.9]], [[0.5, 0.5]]])
    # votes: 1, 0, 1, 0 (argmax of an exact tie inside a shard is its first class) -> 2 vs 2
    pred, share = aggregate(probs, vote="hard")
    assert pred.tolist() == [0]
    assert share.tolist() == [[0.5, 0.5]]
    pred, mean = aggregate(probs, vote="soft")
    assert pred.tolist() == [1]
    np.testing.assert_allclose(mean, [[0.35, 0.65]])
    with pytest.raises(ValueError, match="'vote'"):
        aggregate(probs, vote="median")
