"""The learning benchmark: HeRL against its ablations on the built-in task, over seeds.

    python benchmarks/learning.py [--modes grpo,naive_he,he,herl,herl_goals] [--seeds 0,1,2]
                                  [--config FILE] [--iterations N] [--workers W]
                                  [--out DIR] [--set KEY=VALUE ...]

Every (mode, seed) pair is one herl run with the same config (benchmarks/learning.toml
unless --config is given): same prompts, model, iterations and budget; only `algorithm`
and `seed` differ (and for herl_goals, herl with `hindsight.template = goals`). The
default modes are grpo, naive_he, he and herl. The seed picks the built-in task's prompt
pool, the sampling and the training order, so the three seeds are three draws of the
whole experiment.

The stages run in worker processes, W at a time with 1/W of the cores each, straight
from the stage modules (as the `herl` flow runs them, without Prefect's server: twelve
runs would each pay its start-up). Runs live in OUT/runs/<mode>-seed<seed>; a run that
finished is not run again, so an interrupted benchmark resumes where it stopped.

Writes (OUT defaults to benchmarks/results/learning):
  curves.parquet   one row per (mode, seed, iteration): mean reward of the iteration's
                   rollouts (policy k on fresh samples), all-items-met fraction, and the
                   hindsight statistics of that iteration
  results.md       mean reward per iteration per mode (mean +- std over seeds), and a
                   per-mode summary with the hindsight statistics
  learning.png     the reward curves (mean over seeds, band = min..max)
  heldout.parquet  with task.holdout or evaluation.source and evaluation.every set
                   (--set), one row per (mode, seed, evaluated policy): held-out reward
                   before and after revision rounds; results.md then has a held-out table too
  heldout_answers.parquet  one row per (mode, seed, evaluated policy, held-out prompt): the
                   first answer's text, word count, every item's kind, arguments and
                   strict / loose verdict, and whether the prompt is length-aided
                   (benchmarks/heldout_analysis.py); results.md gets its tables:
                   cluster-bootstrap intervals over prompts, per-seed gains, the split by
                   length-aided prompts, per instruction kind, answer lengths
  item_rates.parquet  one row per (mode, seed, iteration, rubric item kind): the training
                   rollouts' met rate
  provenance.json  the command, herl's commit and the machine (also atop results.md)
and prints results.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # heldout_analysis, beside this script

# mode -> what it sets over the config: an algorithm, and for herl_goals the hindsight
# wording that docs/hindsight.md measured best for small models
MODES: dict[str, dict] = {
    "grpo": {"algorithm": "grpo"},
    "naive_he": {"algorithm": "naive_he"},
    "he": {"algorithm": "he"},
    "herl": {"algorithm": "herl"},
    "herl_goals": {"algorithm": "herl", "hindsight.template": "goals"},
}
DEFAULT_CONFIG = Path(__file__).resolve().parent / "learning.toml"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "learning"
# per-iteration statistics read from the stages' metrics tables: (stage, metric, column)
STATS = (
    ("hindsight", "groups_failed", "groups_failed"),
    ("hindsight", "revisions", "revisions"),
    ("hindsight", "groups_beaten_by_revision", "groups_beaten_by_revision"),
    ("advantages", "hindsight_sequences", "hindsight_sequences"),
    ("advantages", "bonus_applied", "bonus_applied"),
    ("train", "hindsight_token_fraction", "hindsight_token_fraction"),
)


def run_config(job: dict):
    """The config of one (mode, seed) run: the benchmark's config, its overrides, the mode's settings."""
    from schemas.config import load_config

    return load_config(job["config"], {**job["overrides"], **MODES[job["mode"]], "seed": job["seed"],
                                       "run_id": f"{job['mode']}-seed{job['seed']}", "runs_dir": job["runs_dir"]})


def run_one(job: dict) -> dict:
    """One (mode, seed) run, every iteration and stage; returns where it lives and its time."""
    import torch

    torch.set_num_threads(job["threads"])
    from herl.runs.rundir import open_run
    from herl.util.procs import stop_on_signals
    from stages import run_iteration

    stop_on_signals()  # a stop marks the stage failed and stops its train job, as in herl run

    cfg = run_config(job)
    run = open_run(cfg)
    t0 = time.perf_counter()
    ran = 0
    from stages.train import release_trainer

    with run.lock():
        try:
            for k in range(cfg.iterations + 1):
                ran += sum(not m["skipped"] for m in run_iteration(run, k).values())
        finally:
            release_trainer(run)
    seconds = time.perf_counter() - t0
    print(f"  {job['mode']:>8} seed {job['seed']}: {seconds:6.1f} s ({ran} stages run)", flush=True)
    return {"mode": job["mode"], "seed": job["seed"], "path": str(run.path), "seconds": seconds, "stages_run": ran}


def collect(result: dict) -> list[dict]:
    """Per-iteration rows of one run, from its rewards and metrics tables."""
    from herl.runs.query import query_run
    from herl.runs.rundir import load_run
    from schemas.stages import STAGES

    path = result["path"]
    rows = {}
    for k, reward, all_met in query_run(path, """
            select iteration, avg(reward), avg(case when items_met = items_scored then 1.0 else 0.0 end)
            from rewards group by iteration order by iteration""").fetchall():
        rows[k] = {"mode": result["mode"], "seed": result["seed"], "iteration": k, "reward": reward,
                   "all_met": all_met, **{col: 0.0 for _, _, col in STATS}}
    for k, stage, name, value in query_run(path, "select iteration, stage, name, value from metrics").fetchall():
        for s, n, col in STATS:
            if (s, n) == (stage, name) and k in rows:
                rows[k][col] = value
    run = load_run(path)
    for k, row in rows.items():
        row["stage_seconds"] = sum((run.read_manifest(k, s) or {}).get("seconds", 0.0) for s in STAGES)
    return [rows[k] for k in sorted(rows)]


def collect_heldout(result: dict) -> list[dict]:
    """One row per evaluated policy when the config turns the held-out evaluation on:
    mean reward of the first answers and after the last revision round."""
    from herl.runs.query import query_run

    out = query_run(result["path"], """
        select iteration,
               max(value) filter (name = 'round0_mean_reward_strict'),
               max(value) filter (name = 'final_mean_reward_strict'),
               max(value) filter (name = 'round0_prompt_level_strict'),
               max(value) filter (name = 'final_prompt_level_strict'),
               max(value) filter (name = 'round0_instruction_level_strict'),
               max(value) filter (name = 'final_instruction_level_strict'),
               max(value) filter (name = 'round0_prompt_level_loose'),
               max(value) filter (name = 'round0_instruction_level_loose')
        from metrics where stage = 'heldout' group by iteration order by iteration""").fetchall()
    # the IFEval accuracies exist where every evaluated item is an IFEval instruction
    return [{"mode": result["mode"], "seed": result["seed"], "policy": k, "round0": r0, "final": fin,
             "prompt_strict": ps0, "prompt_strict_final": ps1, "instruction_strict": is0,
             "instruction_strict_final": is1, "prompt_loose": pl0, "instruction_loose": il0}
            for k, r0, fin, ps0, ps1, is0, is1, pl0, il0 in out]


def heldout_table(rows: list[dict], modes: list[str]) -> str:
    """Held-out mean reward per evaluated policy and mode: first answer -> last round, mean over seeds."""
    policies = sorted({r["policy"] for r in rows})
    lines = ["", "Held-out prompts (never trained on): mean reward of policy k's first answers -> after the "
                 "last revision round, mean ± std over seeds.", "",
             "| policy | " + " | ".join(modes) + " |", "|---:|" + "---:|" * len(modes)]
    for k in policies:
        cells = []
        for mode in modes:
            got = [r for r in rows if r["mode"] == mode and r["policy"] == k]
            if not got:
                cells.append("-")
                continue
            r0, fin = _mean_std([r["round0"] for r in got]), _mean_std([r["final"] for r in got])
            cells.append(f"{r0[0]:.3f} ± {r0[1]:.3f} -> {fin[0]:.3f} ± {fin[1]:.3f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if any(r.get("prompt_strict") is not None for r in rows):
        lines += ["", "IFEval accuracies of policy k's first answers (prompt-level strict / loose, "
                      "instruction-level strict / loose), and prompt-level strict after the last revision "
                      "round; mean over seeds.", "",
                  "| policy | mode | prompt strict | prompt loose | instruction strict | instruction loose | "
                  "prompt strict after revision |", "|---:|---|---:|---:|---:|---:|---:|"]
        for k in policies:
            for mode in modes:
                got = [r for r in rows if r["mode"] == mode and r["policy"] == k and r.get("prompt_strict") is not None]
                if got:
                    m = {c: _mean_std([r[c] for r in got])[0] for c in (
                        "prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose",
                        "prompt_strict_final")}
                    lines.append(f"| {k} | {mode} | {m['prompt_strict']:.3f} | {m['prompt_loose']:.3f} | "
                                 f"{m['instruction_strict']:.3f} | {m['instruction_loose']:.3f} | "
                                 f"{m['prompt_strict_final']:.3f} |")
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(curves: list[dict], modes: list[str], last: int | None = None) -> str:
    """results.md: the per-iteration reward table and the per-mode summary."""
    iterations = sorted({r["iteration"] for r in curves})
    seeds = sorted({r["seed"] for r in curves})
    by = {(r["mode"], r["seed"], r["iteration"]): r for r in curves}

    def cell(mode: str, k: int, col: str = "reward") -> str:
        vals = [by[(mode, s, k)][col] for s in seeds if (mode, s, k) in by]
        if not vals:
            return "-"
        m, sd = _mean_std(vals)
        return f"{m:.3f} ± {sd:.3f}"

    lines = [f"Mean reward of the iteration's rollouts, mean ± std over seeds {seeds}.", "",
             "| iteration | " + " | ".join(modes) + " |", "|---:|" + "---:|" * len(modes)]
    for k in iterations:
        lines.append(f"| {k} | " + " | ".join(cell(m, k) for m in modes) + " |")

    last = last or max(3, len(iterations) // 4)
    tail = iterations[-last:]
    lines += ["", f"Per mode: reward at iteration 0 and over the last {len(tail)} iterations "
                  "(mean per seed, then mean ± std over seeds); `vs grpo` is the difference to grpo with the "
                  "same seed (same prompts), over the same iterations; hindsight statistics are means per iteration "
                  "over all iterations and seeds.", "",
              "| mode | reward, iter 0 | reward, last | gain | vs grpo, last (paired) | all items met, last "
              "| groups failed | revisions | groups beaten by a revision | hindsight sequences trained "
              "| bonus applied | hindsight token fraction | s per run |",
              "|---|" + "---:|" * 12]
    def tail_mean(mode: str, seed: int) -> float | None:
        vals = [by[(mode, seed, k)]["reward"] for k in tail if (mode, seed, k) in by]
        return statistics.fmean(vals) if len(vals) == len(tail) else None

    for mode in modes:
        per_seed = [[by[(mode, s, k)] for k in iterations if (mode, s, k) in by] for s in seeds]
        per_seed = [rs for rs in per_seed if rs]
        if not per_seed:
            continue
        first = _mean_std([rs[0]["reward"] for rs in per_seed])
        end = _mean_std([statistics.fmean(r["reward"] for r in rs[-last:]) for rs in per_seed])
        gain = _mean_std([statistics.fmean(r["reward"] for r in rs[-last:]) - rs[0]["reward"] for rs in per_seed])
        all_met = _mean_std([statistics.fmean(r["all_met"] for r in rs[-last:]) for rs in per_seed])
        # each seed shares its prompts across modes, so the paired difference removes prompt luck
        diffs = [tail_mean(mode, s) - tail_mean("grpo", s) for s in seeds
                 if tail_mean(mode, s) is not None and tail_mean("grpo", s) is not None]
        vs = f"{_mean_std(diffs)[0]:+.3f} ± {_mean_std(diffs)[1]:.3f}" if diffs and mode != "grpo" else "-"
        flat = [r for rs in per_seed for r in rs]
        avg = {col: statistics.fmean(r[col] for r in flat) for _, _, col in STATS}
        secs = statistics.fmean(sum(r["stage_seconds"] for r in rs) for rs in per_seed)
        lines.append(
            f"| {mode} | {first[0]:.3f} ± {first[1]:.3f} | {end[0]:.3f} ± {end[1]:.3f} | {gain[0]:+.3f} ± {gain[1]:.3f} "
            f"| {vs} | {all_met[0]:.3f} ± {all_met[1]:.3f} | {avg['groups_failed']:.1f} | {avg['revisions']:.1f} "
            f"| {avg['groups_beaten_by_revision']:.2f} | {avg['hindsight_sequences']:.2f} | {avg['bonus_applied']:.2f} "
            f"| {avg['hindsight_token_fraction']:.3f} | {secs:.0f} |")
    return "\n".join(lines) + "\n"


def plot(curves: list[dict], modes: list[str], path: Path) -> None:
    """learning.png: mean reward per iteration per mode, with the min..max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from schemas.tables import atomic_write

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for mode in modes:
        rows = [r for r in curves if r["mode"] == mode]
        if not rows:
            continue
        ks = sorted({r["iteration"] for r in rows})
        for axis, col in ((ax, "reward"), (ax2, "all_met")):
            vals = [[r[col] for r in rows if r["iteration"] == k] for k in ks]
            mean = [statistics.fmean(v) for v in vals]
            line, = axis.plot(ks, mean, marker="o", markersize=3, label=mode)
            axis.fill_between(ks, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.15)
    seeds = sorted({r["seed"] for r in curves})
    ax.set(xlabel="iteration", ylabel="mean reward of rollouts", title=f"reward (mean over seeds {seeds}; band min..max)")
    ax2.set(xlabel="iteration", ylabel="fraction of answers meeting every item", title="answers meeting every item")
    for axis in (ax, ax2):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)


def write_curves(curves: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas.tables import atomic_write

    with atomic_write(path, "wb") as fh:
        pq.write_table(pa.Table.from_pylist(curves), fh)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; whatever way it ends (done, an error, Ctrl-C, SIGTERM) nothing it
    started outlives it."""
    from herl.util.procs import become_subreaper, stop_on_signals, terminate_descendants

    become_subreaper()
    stop_on_signals()
    try:
        return _main(argv)
    finally:
        # twice: what a terminated pool worker leaves is re-parented to this subreaper
        terminate_descendants(passes=2)


def _main(argv: list[str] | None) -> int:
    from schemas.config import parse_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="grpo,naive_he,he,herl", help="comma-separated, from: " + ", ".join(MODES))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--iterations", type=int, default=None, help="override the config's iterations")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="runs in parallel, each with cores/workers threads")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    overrides = parse_overrides(args.set)
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    threads = max(1, (os.cpu_count() or 1) // max(1, args.workers))
    jobs = [{"mode": m, "seed": s, "config": args.config, "overrides": overrides, "threads": threads,
             "runs_dir": str(args.out / "runs")} for s in seeds for m in modes]
    print(f"{len(jobs)} runs ({len(modes)} modes x {len(seeds)} seeds), {args.workers} at a time, "
          f"{threads} thread(s) each; config {args.config}", flush=True)
    t0 = time.perf_counter()
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
            results = pool.map(run_one, jobs, chunksize=1)
    else:
        results = [run_one(job) for job in jobs]
    wall = time.perf_counter() - t0

    import heldout_analysis

    curves = [row for res in results for row in collect(res)]
    args.out.mkdir(parents=True, exist_ok=True)
    prov = heldout_analysis.provenance(sys.argv if argv is None else [sys.argv[0], *argv])
    write_curves(curves, args.out / "curves.parquet")
    report = summarise(curves, modes)
    heldout = [row for res in results for row in collect_heldout(res)]
    if heldout:
        write_curves(heldout, args.out / "heldout.parquet")
        report += heldout_table(heldout, modes)
        answers = [row for res in results for row in heldout_analysis.answer_rows(res)]
        if answers:
            write_curves(answers, args.out / "heldout_answers.parquet")
            report += heldout_analysis.tables(answers, modes)
    rates = [row for res in results for row in heldout_analysis.item_rate_rows(res)]
    write_curves(rates, args.out / "item_rates.parquet")
    ran = sum(res["stages_run"] for res in results)
    if ran:
        report += f"\n{len(jobs)} runs in {wall / 60:.1f} min wall on {os.cpu_count()} cores ({args.workers} in parallel).\n"
    else:  # a re-read of finished runs: its wall time says nothing about the runs
        report += f"\n{len(jobs)} runs, all finished earlier and read from {args.out / 'runs'} (nothing ran now).\n"
    from schemas.tables import atomic_write

    report = (f"Command: `{prov['command']}`  \nherl commit {prov['commit'][:12]}"
              f"{' (with uncommitted changes)' if prov['uncommitted_changes'] else ''}; machine: "
              f"{prov['machine']['cpus']} CPUs ({prov['machine']['cpu'] or 'unknown'}), {prov['machine']['memory']}, "
              f"Python {prov['machine']['python']}; written {prov['written']} (provenance.json).\n\n" + report)
    with atomic_write(args.out / "results.md", "w") as fh:
        fh.write(report)
    with atomic_write(args.out / "provenance.json", "w") as fh:
        json.dump(prov, fh, indent=2)
    plot(curves, modes, args.out / "learning.png")
    print(report)
    print(f"wrote {args.out / 'curves.parquet'}, {args.out / 'results.md'}, {args.out / 'learning.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
