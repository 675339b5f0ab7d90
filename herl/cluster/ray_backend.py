"""The Ray backend (cluster.backend = "ray"): join the cluster, place groups of actors, run
herl functions in them, check that they see the run folder.

Every placed group is one Ray placement group with one actor per bundle: its actors start
together or the group is refused (no half-started trainer), and closing it kills the
actors and removes the placement group, so nothing stays on the cluster after a run. An
actor runs a function named by module and name (`call`), or holds an object such a
function made (`make`, then `invoke` its methods): this layer imports nothing of herl's
training or generation, which say what their actors run.
"""

from __future__ import annotations

import importlib
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from schemas.errors import UserError

RAY_MISSING = "cluster.backend = ray needs Ray, which is not installed here: pip install 'herl[ray]'"
FORWARDED_ENV = ("HERL_", "HF_", "TRANSFORMERS_", "VLLM_", "TOKENIZERS_")  # what actors inherit from the driver


class ClusterError(UserError, RuntimeError):
    """The cluster cannot do what the run asks (no Ray, no room, a node that cannot see the run folder, a lost actor)."""


def ray_module():
    """Ray, or ClusterError(RAY_MISSING) in one line."""
    try:
        import ray
    except ImportError:
        raise ClusterError(RAY_MISSING) from None
    return ray


def require_ray() -> None:
    """Refuse a ray-backed run before anything starts when Ray is missing."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ClusterError(RAY_MISSING)


def actor_env() -> dict[str, str]:
    """The environment every actor of this driver gets: this checkout importable (a node
    may run herl from the shared folder instead of an install) and herl's, Hugging Face's
    and vLLM's settings."""
    root = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def connect(address: str) -> None:
    """Join the Ray cluster at `address` (once per process)."""
    ray = ray_module()
    if ray.is_initialized():
        return
    if not address.startswith("ray://"):
        check_reachable(address)
    try:
        ray.init(address=address, namespace="herl", runtime_env={"env_vars": actor_env()},
                 log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(f"no Ray cluster answers at cluster.address = {address!r} ({first}): start one with "
                           "`ray start --head` (docs/scaling.md), or set cluster.address") from None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse at once a cluster that does not answer (ray.init would retry for minutes):
    `auto` resolved as Ray does (RAY_ADDRESS, else the cluster `ray start` made on this node)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address(address)
    except (ImportError, AttributeError):  # another Ray: leave it to ray.init
        return
    except (ConnectionError, ValueError) as exc:
        raise ClusterError(f"no Ray cluster found for cluster.address = {address!r} ({str(exc).strip().splitlines()[0]}): "
                           "start one with `ray start --head` (docs/scaling.md), or set cluster.address") from None
    if not resolved:
        raise ClusterError(f"no Ray cluster found for cluster.address = {address!r}: start one with `ray start --head` "
                           "(docs/scaling.md), or set cluster.address")
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ClusterError(f"no Ray cluster answers at {resolved} (cluster.address = {address!r}: {exc}): start one "
                           "with `ray start --head` (docs/scaling.md), or set cluster.address") from None


def disconnect() -> None:
    """Leave the cluster (the end of a flow): Ray removes what this driver still owns."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


class Placed:
    """One placed actor: where it runs, and a herl function or object to run there."""

    def __init__(self) -> None:
        self.obj: Any = None

    def node(self) -> dict:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "host": socket.gethostname(), "pid": os.getpid()}

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def read(self, path: str) -> str | None:
        """The text of a file, or None where this node cannot read it."""
        try:
            return Path(path).read_text()
        except OSError:
            return None

    def call(self, module: str, name: str, args: tuple, env: dict[str, str]) -> Any:
        os.environ.update(env)
        return getattr(importlib.import_module(module), name)(*args)

    def make(self, module: str, name: str, args: tuple, kwargs: dict, env: dict[str, str]) -> None:
        os.environ.update(env)
        self.obj = getattr(importlib.import_module(module), name)(*args, **kwargs)

    def invoke(self, method: str, *args: Any) -> Any:
        return getattr(self.obj, method)(*args)


_ACTOR_CLASS: list = []


def _actor_class():
    if not _ACTOR_CLASS:
        _ACTOR_CLASS.append(ray_module().remote(Placed))
    return _ACTOR_CLASS[0]


def describe(node: dict) -> str:
    return f"node {node['ip']} ({node['node_id'][:8]}, host {node['host']})"


def failure_line(exc: BaseException) -> str:
    """One line for a lost actor or node (Ray's errors run to dozens of lines)."""
    ray = ray_module()
    if isinstance(exc, ray.exceptions.NodeDiedError):
        return "its node died"
    if isinstance(exc, (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)):
        return "the actor died (killed, out of memory, or its node was lost)"
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[-1] if text else ''}"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


class PlacedGroup:
    """Actors in one placement group, one per bundle: started together or not at all,
    each checked to see `shared` (the run folder) before it is used."""

    def __init__(self, what: str, bundles: list[dict[str, float]], strategy: str, timeout_s: float,
                 shared: Path, must_read: dict[Path, str] | None = None):
        ray = ray_module()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.what, self.actors, self.nodes = what, [], []
        self.pg = placement_group(bundles, strategy=strategy, name=f"herl-{what.replace(' ', '-')}-{secrets.token_hex(4)}")
        try:
            ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
            if not ready:
                raise ClusterError(f"the Ray cluster has no room for the {what}: {len(bundles)} x {bundles[0]} "
                                   f"({strategy}) asked for {timeout_s:g} s (cluster.start_timeout_s); free now: "
                                   f"{_resources(ray.available_resources())} of {_resources(ray.cluster_resources())}")
            actor = _actor_class()
            for i, b in enumerate(bundles):
                custom = {k: v for k, v in b.items() if k not in ("CPU", "GPU")}
                self.actors.append(actor.options(
                    num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0), resources=custom or None,
                    max_restarts=0, max_task_retries=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.pg, placement_group_bundle_index=i)).remote())
            self.nodes = ray.get([a.node.remote() for a in self.actors], timeout=timeout_s)
            check_shared(self, shared, must_read or {})
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill the actors and remove the placement group (idempotent)."""
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # already removed
                pass
            self.pg = None


def _resources(res: dict) -> str:
    keep = {k: v for k, v in res.items() if k in ("CPU", "GPU") or not (k.startswith("node:") or "memory" in k)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"


def check_shared(group: PlacedGroup, folder: Path, must_read: dict[Path, str]) -> None:
    """Every actor of the group reads a token the driver wrote into `folder` (and each file
    of must_read, expecting its text): a node that cannot is refused by name."""
    ray = ray_module()
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    path = folder / f".cluster-check-{token}"
    path.write_text(token)
    expected = {path: token, **must_read}
    try:  # every actor reads every file, all at once
        refs = {f: [a.read.remote(str(f)) for a in group.actors] for f in expected}
        seen = {f: ray.get(r) for f, r in refs.items()}
    finally:
        path.unlink(missing_ok=True)
    for file, text in expected.items():
        blind = sorted({describe(n) for n, s in zip(group.nodes, seen[file]) if s != text})
        if blind and file == path:
            raise ClusterError(f"the run folder {folder} is not shared with every node of the cluster: "
                               f"{'; '.join(blind)} cannot read the token the driver wrote there. Put runs_dir on a "
                               "file system every node mounts at the same path (NFS, Lustre, a cloud file store)")
        if blind:
            raise ClusterError(f"{file} is missing or different on {'; '.join(blind)}: the model must be at the "
                               "same path on every node (inside the shared folder, or copied to each node)")


class RayRankJob:
    """`n` ranks of one torch.distributed process group as placed actors, each running
    module.name(*args) with the environment torchrun would give it (RANK, WORLD_SIZE,
    MASTER_ADDR, ...; LOCAL_RANK 0: Ray shows each rank its own GPUs). Polled and waited
    on as a subprocess; `stop` kills every rank and removes the placement group."""

    def __init__(self, what: str, n: int, bundle: dict[str, float], strategy: str, timeout_s: float,
                 shared: Path, module: str, name: str, args: tuple, env: dict[str, str]):
        ray = ray_module()
        self.what = what
        self.group = PlacedGroup(what, [dict(bundle) for _ in range(n)], strategy, timeout_s, shared)
        try:
            master = self.group.nodes[0]["ip"]
            port = ray.get(self.group.actors[0].free_port.remote())
            threads = str(max(1, int(bundle.get("CPU", 1))))
            self.refs = [a.call.remote(module, name, args, {
                **env, "RANK": str(i), "WORLD_SIZE": str(n), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                "GROUP_RANK": str(i), "MASTER_ADDR": master, "MASTER_PORT": str(port), "OMP_NUM_THREADS": threads})
                for i, a in enumerate(self.group.actors)]
        except BaseException:
            self.group.close()
            raise
        self.returncode: int | None = None
        self.failure: str | None = None
        self.pid = None  # not a local process

    @property
    def nodes(self) -> list[dict]:
        return self.group.nodes

    def poll(self) -> int | None:
        """None while every rank runs; else the first failing rank's code (1 for a lost one),
        or 0 once all ended cleanly."""
        if self.returncode is not None:
            return self.returncode
        ray = ray_module()
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        codes = []
        for i, ref in enumerate(self.refs):
            if ref not in ready:
                continue
            try:
                codes.append(int(ray.get(ref) or 0))
            except Exception as exc:  # a lost actor or node, or an error inside the rank
                self.failure = f"{self.what}: rank {i} on {describe(self.nodes[i])} was lost: {failure_line(exc)}"
                print(f"herl: {self.failure}", file=sys.stderr, flush=True)
                codes.append(1)
        bad = [c for c in codes if c != 0]
        if bad:
            self.returncode = bad[0]
        elif len(codes) == len(self.refs):
            self.returncode = 0
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.what, timeout or 0.0)
            time.sleep(0.05)
        assert self.returncode is not None
        return self.returncode

    def stop(self) -> None:
        """Kill every rank and remove the placement group."""
        self.group.close()
        if self.returncode is None:
            self.returncode = -9
