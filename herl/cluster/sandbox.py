"""A Ray cluster of several nodes on this one machine, inside a network namespace of its own,
to try cluster.backend = "ray" without a cluster (tests/system/test_cluster.py and
benchmarks/cluster.py use it).

Ray binds to the machine's interface address even when told 127.0.0.1; inside a fresh
network namespace only loopback exists, so all of its traffic stays there. The calling
process moves itself into that namespace (root only; `unshare(CLONE_NEWNET)`), starts the
nodes with `ray start` (each with its own custom resource, node_0, node_1, ...), and at
the end stops exactly the processes of its namespace, nothing else on the machine. Ray's
session files go to a temporary folder of its own, not the machine's /tmp/ray.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile

CLONE_NEWNET = 0x40000000


def namespace(kind: str, pid: int | str = "self") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def processes_in(kind: str, ns: str) -> list:
    """Every other process in namespace `ns` of this kind (net, mnt)."""
    import psutil

    return [p for p in psutil.process_iter() if p.pid != os.getpid() and namespace(kind, p.pid) == ns]


def kill_all(procs: list) -> None:
    """Stop them (SIGTERM, SIGKILL 5 s later for any left)."""
    from herl.util.procs import terminate_then_kill

    terminate_then_kill(procs, grace_s=5.0)


class SandboxCluster:
    """`nodes` Ray nodes with `cpus` logical CPUs each; `address` to join; `stop()` ends them."""

    def __init__(self, nodes: int = 2, cpus: int = 2, port: int = 6390):
        if os.geteuid() != 0:
            raise PermissionError("a network namespace of its own needs root")
        if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        self.net = namespace("net")
        # short: Ray's sockets live under it
        self.tmp = tempfile.mkdtemp(prefix="herl-ray-", dir="/tmp")
        self.env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": self.tmp}
        os.environ.update(self.env)
        self.port, self.address = port, f"127.0.0.1:{port}"
        try:
            for i in range(nodes):
                self.add_node(cpus, {f"node_{i}": 1}, head=i == 0)
        except BaseException:
            self.stop()
            raise

    def add_node(self, cpus: int, resources: dict[str, float], head: bool = False,
                 prefix: tuple[str, ...] = ()) -> None:
        """One more node (`prefix`: a command it is started under, e.g. `unshare --mount ...`)."""
        where = ["--head", f"--port={self.port}", "--include-dashboard=false"] if head else [f"--address={self.address}"]
        subprocess.run([*prefix, sys.executable, "-m", "ray.scripts.scripts", "start", "--disable-usage-stats",
                        f"--num-cpus={cpus}", f"--resources={json.dumps(resources)}", *where],
                       check=True, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=120)

    def stop(self) -> None:
        """Leave the cluster, stop every process of this namespace (its nodes), remove its files."""
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        if self.net is not None:
            kill_all(processes_in("net", self.net))
        shutil.rmtree(self.tmp, ignore_errors=True)
