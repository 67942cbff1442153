"""Several Ray nodes on this machine, for the cluster tests.

Each node is a ``ray start --block`` process in its own session (process group), so a node can be
killed like a lost machine (SIGKILL to its group) without touching the test session's own Ray.
Every process gets ``RAY_AUTH_MODE=disabled`` (nodes and drivers must agree on the auth mode) and
short health-check periods, so a dead node is declared dead in about 3 s instead of about 30.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
SISA = [sys.executable, "-m", "sisa_ray"]


def cluster_env(address: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    })
    if address:
        env["RAY_ADDRESS"] = address
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A head node without CPUs (drivers and idle actors only) and worker nodes with CPUs."""

    def __init__(self, worker_cpus: list[int]) -> None:
        self.worker_cpus = worker_cpus
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    def _start(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", *args],
            env=cluster_env(), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def start(self, timeout: float = 60.0) -> LocalCluster:
        try:
            return self._start_nodes(timeout)
        except BaseException:
            self.stop()  # never leave half a cluster running
            raise

    def _start_nodes(self, timeout: float) -> LocalCluster:
        self.head = self._start(["--head", f"--port={self.port}", "--num-cpus=0",
                                 "--include-dashboard=false"])
        self._wait(1, timeout)
        for i, cpus in enumerate(self.worker_cpus):
            # nodes on one host must not share the agents' ports or the worker port range
            lo = 20000 + 2000 * i
            self.workers.append(self._start([
                f"--address={self.address}", f"--num-cpus={cpus}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--metrics-export-port={_free_port()}",
                f"--min-worker-port={lo}", f"--max-worker-port={lo + 1999}",
            ]))
            self._wait(2 + i, timeout)  # one at a time: they start faster than together
        return self

    def alive_nodes(self) -> int:
        out = subprocess.run(
            [sys.executable, "-c",
             "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"],
            env=cluster_env(self.address), capture_output=True, text=True, timeout=60,
        )
        try:
            return int(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def _wait(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive_nodes() >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"Ray cluster did not reach {n} nodes in {timeout}s")

    def kill_worker(self, i: int) -> None:
        os.killpg(os.getpgid(self.workers[i].pid), signal.SIGKILL)
        self.workers[i].wait()

    def stop(self) -> None:
        for p in [*self.workers, self.head]:
            if p is not None and p.poll() is None:
                try:
                    os.killpg(os.getpgid(p.pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        # `ray start` leaves the head's address for `ray.init()` to find; it is dead now
        marker = Path("/tmp/ray/ray_current_cluster")
        if marker.exists() and marker.read_text().strip().endswith(f":{self.port}"):
            marker.unlink()


def sisa(*args: str, address: str | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*SISA, *args], env=cluster_env(address), capture_output=True,
                          text=True, **kw)


def sisa_background(*args: str, address: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([*SISA, *args], env=cluster_env(address), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
