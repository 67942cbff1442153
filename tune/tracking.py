"""MLflow logging of a comparison, while it runs.

One parent run spans the whole comparison (its duration is the comparison's). Every Tune trial
becomes a child run the moment it starts, gets its per-epoch metrics as it reports them and is
closed when it ends, so the MLflow UI shows trials as they finish. The original model, the naive
retrain and the exact SISA deletion are child runs with their params; at the end the parent gets
the comparison table (``log_table``), the plots (``log_figure``) and the files.

Everything goes through an explicit :class:`mlflow.MlflowClient` and run ids, never MLflow's
global "active run", so Tune's callback thread and the driver cannot trip over each other.
MLflow is imported here only (it costs seconds to import).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def default_tracking_uri() -> str:
    """SQLite in the working directory (MLflow 3 refuses a plain ./mlruns file store)."""
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def tracking_uri(explicit: str | None) -> str:
    """The tracking URI as MLflow users expect: an explicit one (``--mlflow-uri``), else
    ``MLFLOW_TRACKING_URI``, else the SQLite default."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


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


# a trial's own marker of its last report (see tune.compare), not a measurement
NOT_LOGGED = frozenset({"complete"})


def _clean(metrics: dict) -> dict[str, float]:
    """Finite numbers only: MLflow has no null, and an undefined value is absent, not 0."""
    return {
        k: float(v) for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))
        and not math.isinf(float(v))
    }


def readable(value: Any) -> str:
    """A param value as a person reads it: ``finetune,ssd`` for a sequence, not a tuple's repr."""
    if isinstance(value, (list, tuple)):
        return ",".join(readable(v) for v in value)
    return str(value)


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys, readable values; ``None`` (nothing set) is left out."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        elif v is not None:
            out[f"{prefix}{k}"] = readable(v)[:500]
    return out


class ComparisonRun:
    """The MLflow side of one comparison: a parent run and its children.

    Also the observer of the Tune experiment (``trial_started``, ``trial_result``,
    ``trial_finished``): Tune's callback calls these in the driver as trials progress.
    """

    def __init__(self, *, uri: str, experiment: str, run_name: str, params: dict,
                 tags: dict[str, str] | None = None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient

        self.uri = uri
        self.experiment_id = use_experiment(uri, experiment).experiment_id
        self._client = MlflowClient(uri)
        parent = self._client.create_run(self.experiment_id, run_name=run_name,
                                         tags={"kind": "comparison", **(tags or {})})
        self.parent_run_id = parent.info.run_id
        self._log(self.parent_run_id, params=flat_params(params))
        self._trials: dict[str, str] = {}
        self._describe = lambda config: ("trial", {})

    def describe_trials(self, describe) -> None:
        """``describe(config) -> (method, params)``: what a trial's child run is named and which
        params it logs (a trial's config also holds the other methods' draws)."""
        self._describe = describe

    def _log(self, run_id: str, *, params: dict[str, str] | None = None,
             metrics: dict | None = None, tags: dict[str, str] | None = None,
             step: int = 0) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self._client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, step) for k, v in _clean(metrics or {}).items()],
            params=[Param(k, v) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def child(self, name: str, *, tags: dict[str, str], params: dict | None = None,
              metrics: dict | None = None) -> str:
        """A finished child run (the reference rows)."""
        run = self._client.create_run(self.experiment_id, run_name=name, tags={
            "mlflow.parentRunId": self.parent_run_id, **tags})
        self._log(run.info.run_id, params=flat_params(params or {}), metrics=metrics)
        self._client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    # -- the Tune observer ----------------------------------------------------------------------

    def trial_started(self, trial_id: str, config: dict) -> None:
        method, params = self._describe(config)
        run = self._client.create_run(self.experiment_id, run_name=f"{method}-{trial_id}", tags={
            "mlflow.parentRunId": self.parent_run_id, "kind": "approx", "method": method,
            "trial_id": trial_id})
        self._trials[trial_id] = run.info.run_id
        self._log(run.info.run_id, params={"method": method, **flat_params(params)})

    def trial_result(self, trial_id: str, metrics: dict, step: int) -> None:
        if trial_id in self._trials:
            self._log(self._trials[trial_id], step=step,
                      metrics={k: v for k, v in metrics.items() if k not in NOT_LOGGED})

    def trial_finished(self, trial_id: str, error: str | None) -> None:
        run_id = self._trials.pop(trial_id, None)
        if run_id is None:
            return
        if error:
            self._log(run_id, tags={"error": error[:5000]})
        self._client.set_terminated(run_id, "FAILED" if error else "FINISHED")

    # -- the end --------------------------------------------------------------------------------

    def finish(self, *, table: list[dict], figures: dict[str, Any], files: list[Path],
               metrics: dict[str, float]) -> None:
        """Table, plots and files on the parent run, which then ends (FINISHED)."""
        columns = sorted({k for r in table for k in r}, key=lambda k: (k != "method", k))
        data = {c: [_table_cell(r.get(c)) for r in table] for c in columns}
        self._client.log_table(self.parent_run_id, data=data, artifact_file="comparison_table.json")
        for name, fig in figures.items():
            self._client.log_figure(self.parent_run_id, fig, name)
        for path in files:
            self._client.log_artifact(self.parent_run_id, str(path))
        self._log(self.parent_run_id, metrics=metrics)
        for run_id in self._trials.values():  # a trial Tune never reported as ended
            self._client.set_terminated(run_id, "KILLED")
        self._client.set_terminated(self.parent_run_id, "FINISHED")

    def fail(self) -> None:
        for run_id in self._trials.values():
            self._client.set_terminated(run_id, "KILLED")
        self._client.set_terminated(self.parent_run_id, "FAILED")


def _table_cell(v):
    """A table cell MLflow can store: numbers (NaN as None), text, dicts as ``k=v`` text."""
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
