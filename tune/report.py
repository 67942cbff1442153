"""The comparison table (CSV, Markdown, JSON) and plots. Pure: matplotlib with the Agg backend.

Columns are generic: every number a row carries (every field of :class:`approx.metrics.Evaluation`
and what the comparison adds) reaches the CSV and JSON, so a new metric flows through without a
change here. The Markdown table puts the headline columns first and writes ``mean ± spread``
where a ``<name>_std`` column exists (the spread over seeds; for the forgetting quality the
standard error over forget examples).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

# the headline columns, in this order; any other column follows alphabetically
FIRST = [
    "method", "kind", "seeds", "forget_acc", "retain_acc", "test_acc", "forget_gap",
    "retain_gap", "test_gap", "mia", "mia_gap", "activation_distance", "js_divergence",
    "alignment", "forgetting_quality", "score", "forget_mae", "retain_mae", "test_mae",
    "utility", "forgetting", "combined", "seconds", "time_ratio",
]
LAST = ["best_config"]
SPREAD = "_std"


def columns(rows: list[dict]) -> list[str]:
    """Every column some row has, headline columns first, ``best_config`` last."""
    present = {k for r in rows for k in r}
    rest = sorted(present - set(FIRST) - set(LAST))
    return [c for c in FIRST if c in present] + rest + [c for c in LAST if c in present]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, dict):  # a config: significant digits, so lr=3e-05 is not written 0.0000
        return ", ".join(f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={_fmt(x)}"
                         for k, x in v.items()) or "defaults"
    return str(v)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _present(rows: list[dict], col: str) -> bool:
    """A column some row has a real value for (NaN-only columns, e.g. accuracies of a
    regression, are left out of the Markdown table)."""
    return any(col in r and not _missing(r[col]) for r in rows)


def _cell(row: dict, col: str) -> str:
    text = _fmt(row.get(col))
    spread = row.get(col + SPREAD)
    if text != "-" and not _missing(spread):
        text += f" ± {_fmt(spread)}"
    return text


def to_markdown(rows: list[dict]) -> str:
    cols = [c for c in columns(rows) if not c.endswith(SPREAD) and _present(rows, c)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, c) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, js_path = (out_dir / "comparison.csv", out_dir / "comparison.md",
                                  out_dir / "comparison.json")
    cols = columns(rows)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, dict) else ("" if _missing(v) else v))
                        for k, v in r.items()})
    md_path.write_text(to_markdown(rows))
    js_path.write_text(json.dumps([{k: (None if _missing(v) else v) for k, v in r.items()}
                                   for r in rows], indent=1, default=float))
    return [csv_path, md_path, js_path]


def figures(rows: list[dict]) -> dict:
    """``{file name: matplotlib Figure}``: alignment against time, and accuracies (or MAEs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    out = {}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    pts = [r for r in rows if r["kind"] != "original" and not _missing(r.get("seconds"))
           and not _missing(r.get("alignment"))]
    for r in pts:
        marker = {"approx": "o", "exact": "*", "retrain": "s"}[r["kind"]]
        err = r.get("alignment" + SPREAD)
        ax.errorbar(r["seconds"], r["alignment"], yerr=None if _missing(err) else err,
                    fmt=marker, markersize=11 if marker == "*" else 6, capsize=3)
        ax.annotate(r["method"], (r["seconds"], r["alignment"]), fontsize=8,
                    xytext=(5, 4), textcoords="offset points")
    if pts and min(r["seconds"] for r in pts) > 0:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.xaxis.set_minor_formatter(NullFormatter())
        fmt = ScalarFormatter()
        fmt.set_scientific(False)
        ax.xaxis.set_major_formatter(fmt)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel("wall time of the unlearning step (s, log scale)")
    ax.set_ylabel("alignment with the gold model (lower is better)")
    ax.set_title("Alignment vs time per method (bars: spread over seeds)")
    fig.tight_layout()
    out["alignment_vs_time.png"] = fig

    regression = not _present(rows, "test_acc")
    keys = [("forget_mae", "forget"), ("retain_mae", "retain"), ("test_mae", "test")] \
        if regression else [("forget_acc", "forget"), ("retain_acc", "retain"),
                            ("test_acc", "test")]
    fig, ax = plt.subplots(figsize=(max(7.5, 0.9 * len(rows)), 4.8))
    width = 0.27
    xs = range(len(rows))
    for i, (key, label) in enumerate(keys):
        vals = [float("nan") if _missing(r.get(key)) else r[key] for r in rows]
        errs = [0.0 if _missing(r.get(key + SPREAD)) else r[key + SPREAD] for r in rows]
        ax.bar([x + (i - 1) * width for x in xs], vals, width, yerr=errs, capsize=2, label=label)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["method"] for r in rows], rotation=35, ha="right", fontsize=8)
    if regression:
        ax.set_ylabel("mean absolute error")
        ax.set_title("MAE per method")
    else:
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.0)
        ax.set_title("Accuracy per method")
    # beside the axes, never over the bars
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    out["accuracies.png"] = fig
    return out


def write_plots(rows: list[dict], out_dir: Path, figs: dict | None = None) -> list[Path]:
    """Save the figures of :func:`figures` (or ``figs``) as PNG files in ``out_dir``."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in (figs or figures(rows)).items():
        p = out_dir / name
        fig.savefig(p, dpi=110, bbox_inches="tight")
        paths.append(p)
        if figs is None:
            plt.close(fig)
    return paths
