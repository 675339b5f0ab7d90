"""Engines as Ray actors (cluster.backend = "ray"): one engine per actor, the requests of a
generation split over them and their answers merged in request order.

Each actor holds an engine of herl/generation/engines.py (vLLM in its own environment and
process on that node, or transformers), made and driven through herl/cluster. The split
never changes an answer: vLLM seeds every request itself, and the transformers engine
seeds each batch from its requests, so requests are cut only where a one-engine batch
would end (a multiple of rollout.batch_size sequences, at a request's start). A lost
engine actor fails the generation with one line and closes the group: the stage fails
and `herl resume` redoes it on fresh actors.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from herl.cluster.ray_backend import (
    ClusterError,
    PlacedGroup,
    actor_env,
    connect,
    describe,
    failure_line,
    ray_module,
)
from herl.models.tokenizer import load_tokenizer

# herl/generation/engines.py's GenRequest, SamplingParams and Completion travel through here
# untouched (engines.py makes this class; importing it back would be a cycle)


def split_points(sizes: list[int], parts: int, align: int) -> list[tuple[int, int]]:
    """Cut a list of requests (sizes: sequences each) into at most `parts` contiguous,
    non-empty runs of about equal sequences, cutting only before a request whose
    sequence offset is a multiple of `align`. Returns (start, end) request indices."""
    offsets, total = [0], 0
    for n in sizes:
        total += n
        offsets.append(total)
    allowed = [i for i in range(1, len(sizes)) if offsets[i] % align == 0]
    cuts: list[int] = []
    for k in range(1, parts):
        target = k * total / parts
        later = [i for i in allowed if not cuts or i > cuts[-1]]
        if not later:
            break
        cuts.append(min(later, key=lambda i: (abs(offsets[i] - target), i)))
    bounds = [0, *sorted(set(cuts)), len(sizes)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class RayEngines:
    """The Engine protocol over `cluster.engines` engine actors (default vllm.data_parallel_size).
    `kind`: the engine kind, resolved (transformers or vllm)."""

    def __init__(self, kind: str, path: Path, dtype: str, batch_size: int, vllm_cfg, cluster, shared: Path):
        c = cluster
        connect(c.address)
        ray = ray_module()
        self.path, self.kind = Path(path), kind
        self.tokenizer = load_tokenizer(self.path)
        self.batch_size = batch_size
        self.sync_seconds = 0.0
        count = c.engines or vllm_cfg.data_parallel_size
        one = vllm_cfg.model_copy(update={"data_parallel_size": 1})  # each actor is one replica
        gpus = c.engine_gpus
        if gpus is None:
            gpus = float(one.tensor_parallel_size) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        bundle = {"CPU": c.engine_cpus, **({"GPU": gpus} if gpus else {}), **c.engine_resources}
        config = self.path / "config.json"
        self.group = PlacedGroup("engines", [dict(bundle) for _ in range(count)], c.strategy, c.start_timeout_s,
                                 shared, {config: config.read_text()})
        t0 = time.perf_counter()
        try:
            env = {**actor_env(), "OMP_NUM_THREADS": str(max(1, int(c.engine_cpus)))}
            self._all("make", "herl.generation.engines", "load_engine", (kind, str(self.path)),
                      {"dtype": dtype, "batch_size": batch_size, "vllm_cfg": one}, env)
        except BaseException:
            self.close()
            raise
        where = ", ".join(f"engine {i} on {describe(n)} pid {n['pid']}" for i, n in enumerate(self.group.nodes))
        print(f"herl: {count} engines ({kind}) placed on the Ray cluster "
              f"in {time.perf_counter() - t0:.1f} s: {where}", file=sys.stderr, flush=True)

    def _all(self, method: str, *args) -> list:
        """One call per actor, in parallel; a lost actor fails all with one line (and closes the group)."""
        return self._gather([getattr(a, method).remote(*args) for a in self.group.actors], "failed")

    def _gather(self, refs: list, what: str) -> list:
        """Each actor's answer, in order; a lost or failing actor closes the group and fails
        the stage with one line (`engine i on node ... <what>: why`)."""
        ray = ray_module()
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except Exception as exc:
                node = describe(self.group.nodes[i])
                self.close()
                raise ClusterError(f"engine {i} on {node} {what}: {failure_line(exc)}; the stage fails "
                                   "(`herl resume` redoes it on fresh engines)") from None
        return out

    @property
    def closed(self) -> bool:
        """Closed (after a lost actor): the next stage places fresh engines."""
        return not self.group.actors

    def generate(self, requests: list, params) -> list[list]:
        """Completions per request (GenRequest, SamplingParams, Completion of engines.py)."""
        if not requests:
            return []
        if self.closed:
            raise ClusterError("the engines were closed after a failure; the stage is redone by `herl resume`")
        align = self.batch_size if self.kind == "transformers" else 1
        spans = split_points([r.n for r in requests], len(self.group.actors), align)
        actors = self.group.actors[:len(spans)]
        refs = [a.invoke.remote("generate", requests[s:e], params) for a, (s, e) in zip(actors, spans)]
        return [cs for part in self._gather(refs, "was lost during generation") for cs in part]

    def load_weights(self, path: Path) -> None:
        t0 = time.perf_counter()
        self._all("invoke", "load_weights", Path(path))
        self.path, self.sync_seconds = Path(path), time.perf_counter() - t0

    def sleep(self, mode: str) -> None:
        self._all("invoke", "sleep", mode)

    def close(self) -> None:
        ray = sys.modules.get("ray")
        if self.group.actors and ray is not None and ray.is_initialized():
            refs = [a.invoke.remote("close") for a in self.group.actors]
            try:  # vLLM's engine process ends with its actor's engine; a lost actor has nothing to end
                ray.wait(refs, num_returns=len(refs), timeout=60)
            except Exception:
                pass
        self.group.close()
