"""The README's commands work as written: the first session runs line by line in an empty
directory (without Ray, as the README says); the same session on Ray, and the Python snippets of
the library and the approximate methods, run too; every other `sisa-ray` line parses (the ones
that need a cluster, a long-running server or Fashion-MNIST: `serve`, `release`, `abandon`,
`pretrain`, `compare`, `bench` are run by their own tests)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sisa_ray.cli import build_parser
from sisa_ray.predictions import read_provenance

REPO = Path(__file__).resolve().parents[1]


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def sisa_ray_lines(block: str) -> list[list[str]]:
    """The `sisa-ray` commands of a block, as argument lists (comments dropped)."""
    return [shlex.split(line, comments=True) for line in block.splitlines()
            if line.startswith("sisa-ray ")]


def first_session() -> str:
    """The block the README introduces as a first session without Ray."""
    blocks = [b for b in bash_blocks() if "sisa-ray train" in b and "--backend local" in b]
    assert len(blocks) == 1, "the README has one first-session block"
    return blocks[0]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def _env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def run_bash(script: str, cwd: Path, timeout: int) -> str:
    """Run README lines as a user's shell would (stop at the first failure); return stdout."""
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


# commands of the Ray block that a run on one machine can do as written
RUNNABLE = {"train", "delete", "predict", "status", "verify", "recover"}


def ray_session() -> str:
    """The README's block of the same commands on Ray, with the files its lines read (made
    by the first session's lines that write them)."""
    blocks = [b for b in bash_blocks() if "appends to the durable ledger" in b]
    assert len(blocks) == 1, "the README has one block of the commands on Ray"
    setup = [line for line in first_session().splitlines()
             if line.startswith(("printf", "python "))]
    runnable = [line for line in blocks[0].splitlines()
                if line.startswith("sisa-ray ") and shlex.split(line)[1] in RUNNABLE]
    assert len(runnable) == 7, runnable
    return "\n".join(setup + runnable) + "\n"


def test_first_session_commands_say_backend_local_where_they_start_workers():
    for argv in sisa_ray_lines(first_session()):
        assert argv[1] == "status" or "--backend" in argv, argv  # status starts no worker


@pytest.mark.slow
def test_first_session_runs_as_written(tmp_path):
    out = run_bash(first_session(), tmp_path, 600)
    # 42 is in the digits test split: the deletion reaches it there
    assert "removed from the stored test split (no retraining): [42]" in out
    table = pq.read_table(tmp_path / "Y.parquet")
    assert {"id", "prediction", "vote_share", "proba", "label"} <= set(table.column_names)
    prov = read_provenance(table)
    assert prov["store"] == str(tmp_path / "store") and prov["generation"] == 3
    assert "test predictions identical: True" in out
    assert "EXACT: every shard is bit-for-bit" in out


def test_every_sisa_ray_line_in_the_readme_parses():
    parser = build_parser()
    lines = [argv for block in bash_blocks() for argv in sisa_ray_lines(block)]
    commands = {argv[1] for argv in lines}
    assert {"train", "delete", "predict", "status", "verify", "recover", "abandon", "serve",
            "release", "compare", "bench"} <= commands
    for argv in lines:
        try:
            parser.parse_args(argv[1:])
        except SystemExit as e:
            pytest.fail(f"README line does not parse ({e}): {shlex.join(argv)}")


@pytest.mark.slow
@pytest.mark.ray
def test_the_commands_on_ray_run_as_written(tmp_path):
    out = run_bash(ray_session(), tmp_path, 900)
    assert "removed from the stored test split (no retraining): [42]" in out
    assert "EXACT: every shard is bit-for-bit" in out
    assert out.rstrip().endswith("Finished 0 request(s)")  # recover: nothing pending
    prov = read_provenance(pq.read_table(tmp_path / "Y.parquet"))
    assert prov["vote"] == "hard" and prov["generation"] == 3


@pytest.mark.slow
@pytest.mark.ray
def test_the_python_snippets_run_as_written(tmp_path):
    """The predictions input, the library and the approximate-method snippets, in the README's
    order in one interpreter (the approximate snippet uses the library's `ens` and `train`)."""
    blocks = python_blocks()
    assert len(blocks) == 3, "predictions input, the library, approximate methods"
    code = "\n".join(blocks) + (
        "\nimport pyarrow.parquet as pq\n"
        "assert pq.read_table('X.parquet').num_rows == 5\n"
        "assert sorted(report.in_shards + report.in_test_split) == [3, 17, 42]\n"
        "assert result.model is not None and result.seconds > 0\n"
        "print('SNIPPETS OK')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "SNIPPETS OK" in run.stdout
