"""The README's commands work as written: the first session runs line by line in an empty
directory (without Ray, as the README says), and every other `sisa-ray` line parses."""

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


def test_first_session_commands_say_backend_local_where_they_start_workers():
    for argv in sisa_ray_lines(first_session()):
        assert argv[1] == "status" or "--backend" in argv, argv  # status starts no worker


@pytest.mark.slow
def test_first_session_runs_as_written(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", first_session()], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    # 42 is in the digits test split: the deletion reaches it there
    assert "removed from the stored test split (no retraining): [42]" in run.stdout
    table = pq.read_table(tmp_path / "Y.parquet")
    assert {"id", "prediction", "vote_share", "proba", "label"} <= set(table.column_names)
    prov = read_provenance(table)
    assert prov["store"] == str(tmp_path / "store") and prov["generation"] == 3
    assert "test predictions identical: True" in run.stdout
    assert "EXACT: every shard is bit-for-bit" in run.stdout


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
