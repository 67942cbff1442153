"""cluster/: the manifests parse, pin the package's Ray version and dependencies, and do what their
comments promise (GPU image, autoscaling from zero, a service account, the user's --address)."""

import ast
import os
import re
import stat
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def package_ray_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text).group(1)


def package_requirements() -> list[str]:
    """The ``[project] dependencies`` of pyproject.toml, as written."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def dist_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


def docs() -> dict[str, list]:
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in CLUSTER.rglob("*.yaml")}


def aws_setup_requirements() -> list[str]:
    """The quoted requirements the aws.yaml setup commands pip-install on every node."""
    setup = " ".join(docs()["aws.yaml"][0]["setup_commands"])
    assert "pip install" in setup
    return re.findall(r'"([^"]+)"', setup)


def test_manifests_pin_the_package_ray_version():
    version = package_ray_version()
    import ray

    assert ray.__version__ == version
    d = docs()
    assert {"aws.yaml", "raycluster.yaml", "rayjob.yaml"} <= set(d)
    job = next(x for x in d["rayjob.yaml"] if x["kind"] == "RayJob")
    assert d["raycluster.yaml"][0]["spec"]["rayVersion"] == version
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == version
    images = re.findall(r"rayproject/ray:([0-9.]+)-", "".join(
        p.read_text() for p in CLUSTER.rglob("*.yaml")))
    assert images and set(images) == {version}
    assert job["spec"]["entrypoint"].startswith("python -m sisa_ray train")


def test_aws_gpu_workers_use_a_gpu_image_and_cpu_nodes_do_not():
    aws = docs()["aws.yaml"][0]
    types = aws["available_node_types"]
    assert types["gpu_worker"]["docker"]["worker_image"].endswith("-gpu")
    assert aws["docker"]["image"].endswith("-cpu")
    assert "docker" not in types["cpu_worker"] and "docker" not in types["head"]


def test_aws_setup_installs_every_package_dependency_with_its_pin():
    installed = {dist_name(r): r for r in aws_setup_requirements()}
    for req in package_requirements():
        assert installed.get(dist_name(req)) == req, f"aws.yaml setup lacks {req!r}"
    assert "boto3" in installed  # the cluster's store is s3://: the writer lock needs it


def third_party_imports(folders: list[str]) -> set[str]:
    """Top-level modules outside the standard library and this repository that the code imports
    (at module level or inside functions)."""
    local = {"sisa_ray", "approx", "tune"}
    out = set()
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                out.update(n.split(".")[0] for n in names)
    return {m for m in out if m not in sys.stdlib_module_names and m not in local}


def test_every_module_compare_and_bench_import_is_installed_on_the_cluster():
    setup = {dist_name(r) for r in aws_setup_requirements()}
    # modules another installed distribution brings along (Serve's web stack, boto3's core)
    brought_by = {"starlette": "ray", "botocore": "boto3"}
    optional = {"google"}  # the gs:// client, needed for gs:// stores only
    owners = packages_distributions()
    missing = []
    for module in sorted(third_party_imports(["sisa_ray", "approx", "tune"])):
        if module in optional:
            continue
        dists = {d.lower() for d in owners.get(module, [module])}
        dists |= {brought_by[module]} if module in brought_by else set()
        if not dists & setup:
            missing.append((module, sorted(dists)))
    assert missing == []


def test_raycluster_autoscales_the_gpu_group_from_zero():
    spec = docs()["raycluster.yaml"][0]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] > 0
    container = gpu["template"]["spec"]["containers"][0]
    assert container["image"].endswith("-gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_rayjob_pods_run_under_the_service_account_it_defines():
    d = docs()["rayjob.yaml"]
    accounts = [x["metadata"]["name"] for x in d if x["kind"] == "ServiceAccount"]
    job = next(x for x in d if x["kind"] == "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    assert accounts and {p.get("serviceAccountName") for p in pods} == {accounts[0]}


def run_submit(tmp_path, *args) -> list[str]:
    """cluster/submit.sh with a stand-in `ray` on PATH that prints the arguments it gets."""
    fake = tmp_path / "ray"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}",
           "RAY_ADDRESS": "http://head:8265"}
    out = subprocess.run(["bash", str(CLUSTER / "submit.sh"), *args], env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    return out[out.index("--") + 1:]


def test_submit_joins_the_cluster_unless_the_user_names_an_address(tmp_path):
    assert run_submit(tmp_path, "status", "--store", "s3://b/s") == [
        "python", "-m", "sisa_ray", "status", "--store", "s3://b/s", "--address", "auto"]
    assert run_submit(tmp_path, "status", "--address", "ray://other:10001") == [
        "python", "-m", "sisa_ray", "status", "--address", "ray://other:10001"]
    assert run_submit(tmp_path, "status", "--address=ray://other:10001") == [
        "python", "-m", "sisa_ray", "status", "--address=ray://other:10001"]


def test_submit_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(CLUSTER / "submit.sh")], check=True)
