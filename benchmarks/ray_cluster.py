"""A one-node Ray cluster for the benchmarks that measure what a command sees when it joins one."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def local_cluster(num_cpus: int = 2) -> Iterator[tuple[str, dict]]:
    """``ray start --head`` on a free loopback port; yields its address and the environment every
    process joining it must use (the same auth mode, no telemetry). Stopped on exit."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True)
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
