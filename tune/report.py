"""The comparison table (CSV, Markdown) and plots. Pure: matplotlib with the Agg backend."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

COLUMNS = [
    "method", "kind", "forget_acc", "retain_acc", "test_acc", "forget_gap", "retain_gap",
    "test_gap", "mia", "mia_gap", "activation_distance", "js_divergence", "alignment",
    "alignment_std", "forgetting_quality", "score", "forget_mae", "retain_mae", "test_mae",
    "utility", "forgetting", "combined", "seconds", "time_ratio", "seeds", "best_config",
]


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) or "defaults"
    return str(v)


def _present(rows: list[dict], col: str) -> bool:
    """A column some row has a real value for (NaN-only columns, e.g. accuracies of a
    regression, are left out of the Markdown table)."""
    return any(col in r and not (isinstance(r[col], float) and math.isnan(r[col])) for r in rows)


def to_markdown(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if _present(rows, c)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, float("nan"))) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, js_path = (out_dir / "comparison.csv", out_dir / "comparison.md",
                                  out_dir / "comparison.json")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()})
    md_path.write_text(to_markdown(rows))
    js_path.write_text(json.dumps(rows, indent=1, default=float))
    return [csv_path, md_path, js_path]


def write_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["kind"] == "original":
            continue
        marker = {"approx": "o", "exact": "*", "retrain": "s"}[r["kind"]]
        ax.scatter(r["seconds"], r["alignment"], marker=marker, s=90 if marker == "*" else 45)
        ax.annotate(r["method"], (r["seconds"], r["alignment"]), fontsize=8,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("wall time of the unlearning step (s)")
    ax.set_ylabel("alignment with the gold model (lower is better)")
    ax.set_title("Alignment vs time per method")
    fig.tight_layout()
    p = out_dir / "alignment_vs_time.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(rows)), 4.5))
    width = 0.27
    xs = range(len(rows))
    regression = not _present(rows, "test_acc")
    keys = [("forget_mae", "forget"), ("retain_mae", "retain"), ("test_mae", "test")] \
        if regression else [("forget_acc", "forget"), ("retain_acc", "retain"),
                            ("test_acc", "test")]
    for i, (key, label) in enumerate(keys):
        ax.bar([x + (i - 1) * width for x in xs], [r[key] for r in rows], width, label=label)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["method"] for r in rows], rotation=35, ha="right", fontsize=8)
    if regression:
        ax.set_ylabel("mean absolute error")
        ax.set_title("MAE per method")
    else:
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.05)
        ax.set_title("Accuracy per method")
    ax.legend()
    fig.tight_layout()
    p = out_dir / "accuracies.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths
