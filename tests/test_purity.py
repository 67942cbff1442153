"""The pure core imports neither Ray nor MLflow; our generic package names resolve here."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PURE = [
    "sisa_ray.core.config", "sisa_ray.core.plan", "sisa_ray.core.data", "sisa_ray.core.store",
    "sisa_ray.core.checkpoint", "sisa_ray.core.training", "sisa_ray.core.aggregation",
    "sisa_ray.core.ledger", "sisa_ray.core.manifest", "sisa_ray.models", "sisa_ray.datasets",
    "sisa_ray.shard", "sisa_ray.ensemble", "sisa_ray.deletion", "sisa_ray.ingest",
    "sisa_ray.service", "sisa_ray.core.runtime", "sisa_ray.core.jobs", "approx", "approx.methods",
    "approx.metrics", "approx.loop", "tune.objective", "tune.config", "tune.problem", "tune.report",
]


def _fresh_interpreter(code: str) -> str:
    """What ``code`` prints in a new Python process (nothing imported before it)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)
    return out.stdout.strip()


def test_pure_modules_import_no_ray_or_mlflow():
    code = (
        "import importlib, sys\n"
        f"for m in {PURE!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    pulled = _fresh_interpreter(code)
    assert pulled == "", f"pure modules pulled in {pulled}"


def test_core_imports_only_torch_numpy_pyarrow():
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import sisa_ray.core.config, sisa_ray.core.plan, sisa_ray.core.training\n"
        "import sisa_ray.core.checkpoint, sisa_ray.core.ledger, sisa_ray.core.manifest\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(','.join(sorted(new & {'torchvision', 'sklearn', 'ray', 'mlflow', 'pandas'})))\n"
    )
    assert _fresh_interpreter(code) == ""


def test_a_driver_does_not_load_torch():
    """status, delete and predict on Ray run in a driver that trains nothing: importing torch
    would cost it seconds per command (the workers have it loaded)."""
    code = (
        "import sys\n"
        "import sisa_ray.cli, sisa_ray.ensemble, sisa_ray.deletion, sisa_ray.executor\n"
        "import sisa_ray.service, sisa_ray.ingest\n"
        "print(','.join(sorted(m for m in ('torch', 'torchvision', 'pandas', 'mlflow')\n"
        "                      if m in sys.modules)))\n"
    )
    assert _fresh_interpreter(code) == ""


def test_generic_package_names_resolve_to_this_repository():
    import approx
    import tune

    assert Path(approx.__file__).resolve().is_relative_to(REPO)
    assert Path(tune.__file__).resolve().is_relative_to(REPO)
