"""The objective of the comparison: how far an unlearned model is from the gold model.

``alignment = |forget_gap| + |mia_gap| + max(0, -retain_gap) + max(0, -test_gap)``

Gaps are *unlearned minus gold* (accuracies and MIA accuracy, all in [0, 1]). The forget-set
accuracy and the membership-inference accuracy must match the gold's from either side (forgetting
too little leaks, forgetting too much is itself a signal, the "Streisand effect"); retain and test
accuracy are only penalised when they drop. 0 means indistinguishable from the gold on these four
axes; lower is better. Time is reported beside it, not folded in.

Regression has no accuracies: its objective is ``1 - utility * forgetting`` (the combined score
of :func:`approx.metrics.regression_scores`; 0 when the model errs exactly like the gold model).
Pure Python: no Ray here.
"""

from __future__ import annotations

from collections.abc import Mapping


def alignment(metrics: Mapping[str, float]) -> float:
    """Alignment score from a metrics mapping with ``forget_gap``, ``mia_gap``, ``retain_gap``
    and ``test_gap``."""
    combined = metrics.get("combined")
    if combined is not None and combined == combined:  # regression
        return 1.0 - combined
    missing = [k for k in ("forget_gap", "mia_gap", "retain_gap", "test_gap") if k not in metrics]
    if missing:
        raise KeyError(f"alignment needs the gap metrics {missing}; evaluate against a gold model.")
    return (
        abs(metrics["forget_gap"]) + abs(metrics["mia_gap"])
        + max(0.0, -metrics["retain_gap"]) + max(0.0, -metrics["test_gap"])
    )
