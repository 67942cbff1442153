"""MLflow logging of a comparison: one parent run, a child run per Tune trial, child runs for the
original model, the naive retrain and the exact SISA deletion, and the table and plots as
artifacts. MLflow is imported here only (it costs seconds to import).
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def default_tracking_uri() -> str:
    """SQLite in the working directory (MLflow 3 refuses a plain ./mlruns file store)."""
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def use_experiment(uri: str, name: str):
    """Point MLflow at ``uri`` and experiment ``name``; a new experiment on a SQLite store keeps
    its artifacts beside the database (``mlartifacts/``), not in whatever directory the command
    happened to run from."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(name) is None and uri.startswith("sqlite:///"):
        root = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
        mlflow.create_experiment(name, artifact_location=root.as_uri())
    return mlflow.set_experiment(name)


def _clean(metrics: dict) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))
        and not math.isinf(float(v))
    }


def _params(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]
    return out


def log_comparison(
    *, uri: str, experiment: str, run_name: str, params: dict, trials: list[dict],
    rows: list[dict], artifacts: list[Path],
) -> dict[str, str]:
    """Log everything; return ``{"experiment_id", "parent_run_id"}``."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    exp = use_experiment(uri, experiment)
    with mlflow.start_run(run_name=run_name) as parent:
        mlflow.set_tags({"kind": "comparison", "sisa_ray.target": params.get("target", "")})
        mlflow.log_params(_params(params))
        for t in trials:
            with mlflow.start_run(run_name=f"{t['method']}-{t['index']}", nested=True):
                mlflow.set_tags({"method": t["method"], "kind": "approx",
                                 "trial_id": str(t.get("trial_id")),
                                 "error": str(t.get("error") or "")})
                mlflow.log_params(_params(t["config"]))
                mlflow.log_metrics(_clean(t["metrics"]))
        for r in rows:
            if r["kind"] in ("original", "retrain", "exact"):
                with mlflow.start_run(run_name=r["method"], nested=True):
                    mlflow.set_tags({"method": r["method"], "kind": r["kind"]})
                    mlflow.log_metrics(_clean(r))
            else:
                mlflow.log_metrics(_clean({f"best.{r['method']}.{k}": v for k, v in r.items()}))
        for path in artifacts:
            mlflow.log_artifact(str(path))
        return {"experiment_id": exp.experiment_id, "parent_run_id": parent.info.run_id}
