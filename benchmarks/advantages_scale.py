"""The advantages stage at a million rollouts: DuckDB SQL against a plain Python loop.

    python benchmarks/advantages_scale.py [--rollouts 1000000] [--group 8] [--check 10000]

Writes synthetic iteration tables that follow schemas/tables.py (rollouts, rewards,
hindsight; groups of `group`, one revision per candidate of ~14% of the rollouts,
prompts of 48 tokens, answers of 96, rewards on a grid of 0.1), then runs
  sql     the advantages stage itself (stages/advantages.py `run`), Parquet in and out;
          its inputs were written by herl (as by the stages that write them), so their
          digests come from those stages' manifests
  sql-rehash  the same, hashing its inputs again (as herl did before digests were
          recorded at write time, and as for tables herl did not write)
  python  the same algorithm as a plain Python loop over groups (reading the same
          Parquet files' narrow columns, no output written)
and prints a table of seconds and peak resident memory (each in its own process).
First it checks that the two give the same advantages on `check` rollouts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from herl.util.procs import peak_rss_gb  # noqa: E402
from schemas.tables import TABLES  # noqa: E402

PROMPT_TOKENS, RESPONSE_TOKENS = 48, 96


def _token_lists(n: int, width: int, rng) -> pa.ListArray:
    values = pa.array(rng.integers(0, 49152, n * width, dtype=np.int32))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32)), values)


def _float_lists(n: int, width: int, rng) -> pa.ListArray:
    values = pa.array(-rng.random(n * width, dtype=np.float32))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32)), values)


def _table(name: str, cols: dict) -> pa.Table:
    schema = TABLES[name].schema
    return pa.table({f.name: cols[f.name] for f in schema}, schema=schema)


def write_synthetic(run_dir: Path, rollouts: int, group: int, seed: int = 0) -> None:
    """iter-0/{rollouts,rewards,hindsight}.parquet of a run folder, plus its config."""
    from herl.runs.rundir import open_run
    from schemas.config import load_config

    rng = np.random.default_rng(seed)
    cfg = load_config(None, {"run_id": run_dir.name, "runs_dir": str(run_dir.parent), "iterations": 1})
    run = open_run(cfg)
    run.iter_dir(0).mkdir(parents=True, exist_ok=True)
    n, prompts = rollouts, rollouts // group
    pid = np.repeat(np.arange(prompts), group)
    prompt_ids = pa.array([f"p{i:07d}" for i in range(prompts)]).take(pa.array(pid))
    rollout_ids = pa.array([f"p{p:07d}:{s}" for p, s in zip(pid, np.tile(np.arange(group), prompts))])
    reward = np.round(rng.random(n) ** 2, 1)  # many failed groups (best < 1)
    text = pa.array(["x" * 300] * n)
    const = lambda v, t: pa.array(np.full(n, v), t)  # noqa: E731
    _write_as_stage(run, "rollout", "rollouts", _table("rollouts", {
        "run_id": const(cfg.run_id, pa.string()), "iteration": const(0, pa.int32()), "rollout_id": rollout_ids,
        "prompt_id": prompt_ids, "sample_index": pa.array(np.tile(np.arange(group, dtype=np.int32), prompts)),
        "prompt_text": text, "prompt_token_ids": _token_lists(n, PROMPT_TOKENS, rng), "response_text": text,
        "response_token_ids": _token_lists(n, RESPONSE_TOKENS, rng), "finish_reason": const("stop", pa.string()),
        "num_tokens": const(RESPONSE_TOKENS, pa.int32()), "seed": const(0, pa.int64()),
        "snapshot_id": const("s", pa.string()), "logprobs": _float_lists(n, RESPONSE_TOKENS, rng),
        "temperature": const(1.0, pa.float64())}))
    items_total = 5
    met = np.round(reward * items_total).astype(np.int32)
    reward_cols = {"run_id": const(cfg.run_id, pa.string()), "iteration": const(0, pa.int32()),
                   "rollout_id": rollout_ids, "prompt_id": prompt_ids, "reward": pa.array(reward),
                   "items_met": pa.array(met), "items_scored": const(items_total, pa.int32()),
                   "items_unknown": const(0, pa.int32())}
    _write_as_stage(run, "grade", "rewards", _table("rewards", reward_cols))
    # revisions: the best-ranked member of ~1/group of... enough groups for ~14% of the rollouts
    cand = np.sort(rng.choice(n, size=int(0.139 * n), replace=False))
    m = len(cand)
    rev_reward = np.round(rng.random(m), 1)
    hcols = {
        "run_id": pa.array(np.full(m, cfg.run_id)), "iteration": pa.array(np.zeros(m, np.int32)),
        "revision_id": pa.array([f"{rollout_ids[i].as_py()}:rev-0" for i in cand]),
        "candidate_rollout_id": rollout_ids.take(pa.array(cand)), "prompt_id": prompt_ids.take(pa.array(cand)),
        "revision_index": pa.array(np.zeros(m, np.int32)), "hindsight_prompt_text": pa.array(["h" * 600] * m),
        "prompt_token_ids": _token_lists(m, 2 * PROMPT_TOKENS, rng), "response_text": pa.array(["y" * 300] * m),
        "response_token_ids": _token_lists(m, RESPONSE_TOKENS, rng), "finish_reason": pa.array(["stop"] * m),
        "num_tokens": pa.array(np.full(m, RESPONSE_TOKENS, np.int32)), "seed": pa.array(np.zeros(m, np.int64)),
        "snapshot_id": pa.array(["s"] * m), "logprobs": _float_lists(m, RESPONSE_TOKENS, rng),
        "temperature": pa.array(np.full(m, 1.0)),
        "reward": pa.array(rev_reward), "items_met": pa.array(np.round(rev_reward * 5).astype(np.int32)),
        "items_scored": pa.array(np.full(m, 5, np.int32)),
    }
    schema = TABLES["hindsight"].schema
    for f in schema:
        if f.name not in hcols:
            hcols[f.name] = pa.array(np.zeros(m), pa.float64()).cast(f.type) if pa.types.is_floating(f.type) \
                else pa.nulls(m, f.type)
    _write_as_stage(run, "hindsight", "hindsight",
                    pa.table({f.name: hcols[f.name].cast(f.type) for f in schema}, schema=schema))


def _write_as_stage(run, stage: str, name: str, table: pa.Table) -> None:
    """Write a table as stage `stage` would: through schemas.tables.write_table, with a
    manifest recording its digest (hashed as it was written)."""
    from schemas.tables import write_table

    path = run.table(0, name)
    run.run_stage(0, stage, {}, lambda: {name: (path, write_table(name, table, path))})


def python_advantages(run_dir: Path) -> dict[str, float]:
    """The algorithm as a plain loop over groups: {sample_id: advantage}. Mirrors
    herl/sql/advantages.sql with the default config (bonus on, alpha 0.05, top-1
    replacement, duplicate fallback, std normalisation)."""
    from schemas.config import load_config

    cfg = load_config(str(run_dir / "config.json"))
    a, seed = cfg.advantages, f"{cfg.seed}:0"
    ro = pq.read_table(run_dir / "iter-0" / "rollouts.parquet", columns=["rollout_id", "prompt_id", "sample_index"])
    rw = pq.read_table(run_dir / "iter-0" / "rewards.parquet", columns=["rollout_id", "reward", "items_met"])
    hs = pq.read_table(run_dir / "iter-0" / "hindsight.parquet",
                       columns=["revision_id", "candidate_rollout_id", "prompt_id", "reward", "revision_index",
                                "response_text"])
    rewards = dict(zip(rw.column("rollout_id").to_pylist(), zip(rw.column("reward").to_pylist(),
                                                                 rw.column("items_met").to_pylist())))
    groups: dict[str, list[tuple]] = {}
    for rid, pid, si in zip(*(ro.column(c).to_pylist() for c in ("rollout_id", "prompt_id", "sample_index"))):
        r, met = rewards[rid]
        groups.setdefault(pid, []).append((rid, si, r, met))
    revisions: dict[str, list[tuple]] = {}
    revised_groups = set()
    for rev, cand, pid, r, idx, text in zip(*(hs.column(c).to_pylist() for c in hs.column_names)):
        revised_groups.add(pid)
        if text.strip():
            revisions.setdefault(pid, []).append((rev, cand, r, idx))
    out: dict[str, float] = {}
    for pid, members in groups.items():
        best = max(m[2] for m in members)
        by_id = {m[0]: m for m in members}
        best_rev: dict[str, float] = {}
        for _rev, cand, r, _idx in revisions.get(pid, []):
            best_rev[cand] = max(best_rev.get(cand, -1.0), r)
        shaped = {m[0]: m[2] + a.alpha * (best_rev[m[0]] - m[2]) if m[0] in best_rev else m[2] for m in members}
        samples = dict(shaped)
        if best < cfg.hindsight.threshold and pid in revised_groups:
            qual = [(1 if r > best else 2, -r, -by_id[c][3], by_id[c][1], idx, rev, r)
                    for rev, c, r, idx in revisions.get(pid, []) if r >= best]
            kept = sorted(qual)[: a.replace_top_n]
            fills = [(q[5], q[6]) for q in kept]
            if a.duplicate_best_fallback:
                top = min((m for m in members if m[2] == best), key=lambda m: (-m[3], m[1]))
                fills += [(f"{top[0]}:dup-{s}", shaped[top[0]]) for s in range(len(fills) + 1, a.replace_top_n + 1)]
            order = sorted(by_id, key=lambda rid: hashlib.md5(f"{seed}:{rid}".encode()).hexdigest())
            for victim, (sid, r) in zip(order, fills):
                del samples[victim]
                samples[sid] = r
        vals = list(samples.values())
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        for sid, v in samples.items():
            out[sid] = v if len(vals) == 1 else ((v - mean) / (std + a.eps) if a.std_normalize else v - mean)
    return out


def _measure(mode: str, run_dir: Path) -> dict:
    """Run one mode in this process; returns seconds and peak RSS (GB)."""
    t0 = time.perf_counter()
    if mode.startswith("sql"):
        from herl.runs.rundir import Run, load_run
        from stages import advantages

        if mode == "sql-rehash":
            Run.recall_digests = lambda self, paths, manifests=None: None  # type: ignore[method-assign]
        run = load_run(run_dir)
        run.manifest_path(0, "advantages").unlink(missing_ok=True)
        advantages.run(run, 0)
    else:
        python_advantages(run_dir)
    return {"mode": mode, "seconds": time.perf_counter() - t0,
            "peak_rss_gb": peak_rss_gb()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=1_000_000)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--check", type=int, default=10_000)
    ap.add_argument("--measure", choices=["sql", "sql-rehash", "python"], help=argparse.SUPPRESS)  # one mode, in a child
    ap.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure, args.run_dir)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        # agreement first, on a small instance
        small = Path(tmp) / "check"
        write_synthetic(small, args.check, args.group)
        _measure("sql", small)
        from schemas.tables import read_table

        batch = read_table("batch", small / "iter-0" / "batch.parquet")
        sql = dict(zip(batch.column("sample_id").to_pylist(), batch.column("advantage").to_pylist()))
        py = python_advantages(small)
        worst = max(abs(sql[k] - py[k]) for k in py) if set(sql) == set(py) else float("inf")
        print(f"agreement on {args.check} rollouts: same {len(py)} sequences: {set(sql) == set(py)}, "
              f"largest advantage difference {worst:.2e}")
        if worst > 1e-9:
            return 1
        big = Path(tmp) / "big"
        t0 = time.perf_counter()
        write_synthetic(big, args.rollouts, args.group)
        size = sum(f.stat().st_size for f in (big / "iter-0").glob("*.parquet"))
        print(f"synthetic tables: {args.rollouts:,} rollouts, {size / 1e9:.2f} GB of Parquet "
              f"({time.perf_counter() - t0:.0f} s to write)")
        rows = []
        for mode in ("sql", "sql-rehash", "python"):
            out = subprocess.run([sys.executable, __file__, "--measure", mode, "--run-dir", str(big)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n| {args.rollouts:,} rollouts, groups of {args.group} | seconds | peak RSS GB |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} |")
    py = rows[-1]["seconds"]
    print(f"\nPython / SQL: {py / rows[0]['seconds']:.1f}x (inputs' digests recorded), "
          f"{py / rows[1]['seconds']:.1f}x (inputs hashed again)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
