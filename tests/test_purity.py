"""The pure core imports neither Ray nor MLflow; our generic package names resolve here."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PURE = [
    "sisa_ray.core.config", "sisa_ray.core.plan", "sisa_ray.core.data", "sisa_ray.core.store",
    "sisa_ray.core.checkpoint", "sisa_ray.core.training", "sisa_ray.core.aggregation",
    "sisa_ray.core.ledger", "sisa_ray.core.manifest", "sisa_ray.models", "sisa_ray.datasets",
    "sisa_ray.shard", "sisa_ray.ensemble", "approx", "approx.methods", "approx.metrics",
    "approx.loop", "tune.objective", "tune.spaces", "tune.problem", "tune.report",
]


def test_pure_modules_import_no_ray_or_mlflow():
    code = (
        "import importlib, sys\n"
        f"for m in {PURE!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert out.stdout.strip() == "", f"pure modules pulled in {out.stdout.strip()}"


def test_core_imports_only_torch_numpy_pyarrow():
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import sisa_ray.core.config, sisa_ray.core.plan, sisa_ray.core.training\n"
        "import sisa_ray.core.checkpoint, sisa_ray.core.ledger, sisa_ray.core.manifest\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(','.join(sorted(new & {'torchvision', 'sklearn', 'ray', 'mlflow', 'pandas'})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert out.stdout.strip() == ""


def test_generic_package_names_resolve_to_this_repository():
    import approx
    import tune

    assert Path(approx.__file__).resolve().is_relative_to(REPO)
    assert Path(tune.__file__).resolve().is_relative_to(REPO)
