"""A run on a Ray cluster (cluster.backend = ray) against the same run on this machine
(local): seconds per stage, and the overhead Ray adds.

    pip install 'herl[ray]'
    python benchmarks/cluster.py [--config CONFIG] [--iterations 3] [--ranks 2] [--engines 2]
                                 [--address HOST:PORT] [--out benchmarks/results/cluster] [--set KEY=VALUE ...]

Without --address (root only) it starts a two-node Ray cluster on this machine inside a
network namespace of its own (herl/cluster/sandbox.py: only loopback, its processes
stopped at the end), so "two nodes" share this machine's cores: the figures are Ray's
overhead (placing actors, moving requests and answers, a process group over TCP), not a
speed-up. With --address the ray run joins that cluster (its nodes must see --work).

Both runs do the same work (the same config and seed; the local one trains with
train.launcher.num_processes = --ranks processes and one engine, the ray one with --ranks
trainer ranks and --engines engines, placed STRICT_SPREAD when the cluster has that many
nodes, else PACK); their tables agree (tests/system/test_cluster.py checks it). The stages
run in order without Prefect (stages.run_iteration), one run after the other.

Writes OUT/results.json and OUT/results.md (the table, the machine's load before each run)
and prints results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGE_ORDER = ("heldout", "rollout", "grade", "hindsight", "advantages", "train")


def _one_run(cfg_path: str | None, overrides: dict, work: Path) -> dict:
    from herl.generation.engines import release_engines
    from herl.runs.rundir import open_run
    from herl.runs.status import stage_status
    from schemas.config import load_config
    from stages import run_iteration
    from stages.train import release_trainer

    run = open_run(load_config(cfg_path, {**overrides, "runs_dir": str(work)}))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        for k in range(run.cfg.iterations):
            run_iteration(run, k)
    finally:
        release_trainer(run)
        release_engines()
    wall = time.perf_counter() - t0
    per_stage: dict[str, list[float]] = {}
    for r in stage_status(run.path):
        if r["status"] == "done" and r["seconds"] is not None:
            per_stage.setdefault(r["stage"], []).append(float(r["seconds"]))
    return {"wall_seconds": wall, "load_before": load, "stages": per_stage}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a herl config (default: the embedded tiny preset)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2, help="trainer ranks (local: processes)")
    ap.add_argument("--engines", type=int, default=2, help="engine actors on the cluster")
    ap.add_argument("--address", default=None, help="an existing Ray cluster (default: a two-node sandbox, root)")
    ap.add_argument("--work", default="/tmp/herl-bench-cluster", help="where the runs go (removed first)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cluster"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides (TOML values)")
    args = ap.parse_args(argv)

    from schemas.config import parse_overrides

    sandbox = None
    address = args.address
    if address is None:
        from herl.cluster.sandbox import SandboxCluster

        sandbox = SandboxCluster(nodes=2, cpus=2)
        address = sandbox.address
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    base = {"iterations": args.iterations, "train.launcher.num_processes": args.ranks, **parse_overrides(args.set)}
    results = {}
    try:
        import ray

        from herl.cluster.ray_backend import connect

        connect(address)
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        strategy = "STRICT_SPREAD" if nodes >= max(args.ranks, args.engines) else "PACK"
        runs = {"local": {**base, "run_id": "local"},
                "ray": {**base, "run_id": "ray", "cluster.backend": "ray", "cluster.address": address,
                        "cluster.engines": args.engines, "cluster.strategy": strategy}}
        for name, overrides in runs.items():
            print(f"== {name} run ({args.iterations} iterations)", file=sys.stderr, flush=True)
            results[name] = _one_run(args.config, overrides, work)
    finally:
        if sandbox is not None:
            sandbox.stop()

    lines = [f"# herl on a Ray cluster against one machine ({args.iterations} iterations, "
             f"{args.ranks} trainer ranks, {args.engines} engines)", "",
             f"cluster: {'a two-node sandbox on this machine (' + str(os.cpu_count()) + ' cores shared)' if sandbox else address}; "
             f"placement {strategy}; load before: local {results['local']['load_before']:.2f}, "
             f"ray {results['ray']['load_before']:.2f}", "",
             "| stage | local s (first / later mean) | ray s (first / later mean) | ray - local, later iterations |",
             "|---|---|---|---|"]

    def first_later(xs: list[float]) -> tuple[float, float]:
        return xs[0], (sum(xs[1:]) / len(xs[1:]) if len(xs) > 1 else float("nan"))

    for stage in STAGE_ORDER:
        if stage not in results["local"]["stages"]:
            continue
        lf, ll = first_later(results["local"]["stages"][stage])
        rf, rl = first_later(results["ray"]["stages"].get(stage, [float("nan")]))
        lines.append(f"| {stage} | {lf:.2f} / {ll:.2f} | {rf:.2f} / {rl:.2f} | {rl - ll:+.2f} |")
    lw, rw = results["local"]["wall_seconds"], results["ray"]["wall_seconds"]
    lines.append(f"| **run (wall)** | {lw:.1f} | {rw:.1f} | {rw - lw:+.1f} ({(rw / lw - 1) * 100:+.0f} %) |")
    lines += ["", "The first iteration holds the one-time costs (the ray run: placing the engines and the "
              "trainer ranks, each actor's imports and model load; the local run: the engine's load and the "
              "trainer's start); later iterations are the steady state."]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "strategy": strategy, **results}, indent=2))
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
