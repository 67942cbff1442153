"""cluster/: the manifests parse and pin the same Ray version as the package."""

import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def package_ray_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text).group(1)


def test_manifests_pin_the_package_ray_version():
    version = package_ray_version()
    import ray

    assert ray.__version__ == version
    docs = {p.name: yaml.safe_load(p.read_text()) for p in (REPO / "cluster").rglob("*.yaml")}
    assert {"aws.yaml", "raycluster.yaml", "rayjob.yaml"} <= set(docs)
    assert docs["raycluster.yaml"]["spec"]["rayVersion"] == version
    assert docs["rayjob.yaml"]["spec"]["rayClusterSpec"]["rayVersion"] == version
    images = re.findall(r"rayproject/ray:([0-9.]+)-", "".join(
        p.read_text() for p in (REPO / "cluster").rglob("*.yaml")))
    assert images and set(images) == {version}
    assert docs["rayjob.yaml"]["spec"]["entrypoint"].startswith("python -m sisa_ray train")


def test_submit_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "cluster" / "submit.sh")], check=True)
