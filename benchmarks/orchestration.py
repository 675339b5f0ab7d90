"""What the orchestration costs: `herl run` (Prefect on) against the same stages in a plain loop.

    python benchmarks/orchestration.py [--config FILE] [--repeats 2] [--set KEY=VALUE ...]

Each repeat runs the same run twice, one after the other, as whole commands (process
start to exit, as a user waits for them):

  prefect   `herl run`: supervisor, pre-flight checks, Prefect's temporary server, the
            `herl` flow (a task per stage, artifacts, trackers, plot.png at the end)
  plain     this script's plain loop in a fresh process: the same pre-flight checks, the
            stages of every iteration in order (stages.run_iteration), plot.png at the end;
            no Prefect at all

For each: wall seconds, seconds inside the stages (their manifests), the rest and its
share of the wall time, and where the rest went (start-up until the first stage began,
the gaps between stages, the last stage's end to the command's exit). The prefect row
minus the plain row is what Prefect itself costs. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# a stage's own line, from the flow's log or the plain loop: "rollout iteration 3: done (4.2 s)"
STAGE_LINE = re.compile(r"^\s*([\d.]+) .*\b(\w+) iteration (\d+): (?:done|skipped)\S* .*?\(([\d.]+) s\)\s*$")


def plain_loop(args) -> int:
    """The stages without Prefect, timed as the flow's log times them (one line per stage)."""
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"{time.perf_counter() - t0:8.2f} {msg}", flush=True)

    from herl.data.pool import check_pool_fits
    from herl.generation.engines import release_engines
    from herl.runs.plot import plot_run
    from herl.runs.rundir import open_run
    from herl.runs.tracking import check_trackers, sync_trackers
    from schemas.config import load_config, parse_overrides
    from stages import run_named_stage

    cfg = load_config(args.config, {**parse_overrides(args.set), "runs_dir": args.runs_dir, "run_id": args.run_id})
    check_pool_fits(cfg)
    check_trackers(cfg)
    run = open_run(cfg)
    with run.lock():
        try:
            for k in range(cfg.iterations + 1):
                for stage in cfg.iteration_stages(k):
                    m = run_named_stage(stage, run, k)
                    say(f"{stage} iteration {k}: {m['status']} ({m.get('seconds', 0.0):.1f} s)")
                if cfg.iteration_stages(k):
                    sync_trackers(run, k, logging.getLogger("herl"))
        finally:
            release_engines()
    plot_run(run.path)
    return 0


def timed(cmd: list[str], log: Path) -> tuple[float, list[tuple[float, str, float]]]:
    """Run `cmd`, stamping each output line with seconds since its start; wall seconds and
    the stage lines (time the line was printed, stage, the stage's own seconds)."""
    t0 = time.perf_counter()
    stages = []
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            stamped = f"{time.perf_counter() - t0:8.2f} {line}"
            fh.write(stamped)
            m = STAGE_LINE.match(stamped)
            if m:
                stages.append((float(m.group(1)), m.group(2), float(m.group(4))))
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); its output: {log}")
    return wall, stages


def breakdown(wall: float, stages: list[tuple[float, str, float]]) -> dict[str, float]:
    """Wall, stage seconds and where the rest went, from the stamped stage lines."""
    in_stages = sum(s for _, _, s in stages)
    start = stages[0][0] - stages[0][2]  # when the first stage began
    gaps = sum(t - prev - s for (prev, _, _), (t, _, s) in zip(stages, stages[1:]))
    return {"wall": wall, "stages": in_stages, "rest": wall - in_stages, "start": start, "gaps": gaps,
            "end": wall - stages[-1][0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)  # the plain arm's own process
    ap.add_argument("--runs-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_loop:
        return plain_loop(args)

    work = Path(tempfile.mkdtemp(prefix="herl-orchestration-"))
    extra = [*(["--config", args.config] if args.config else []), *(x for s in args.set for x in ("--set", s))]
    rows: dict[str, list[dict[str, float]]] = {"prefect": [], "plain": []}
    for r in range(args.repeats):
        for arm in ("prefect", "plain") if r % 2 == 0 else ("plain", "prefect"):  # interleaved
            runs = work / f"{arm}-{r}"
            if arm == "prefect":
                cmd = [sys.executable, "-m", "herl.commands.cli", "run", "--runs-dir", str(runs), "--run-id", "r", *extra]
            else:
                cmd = [sys.executable, __file__, "--plain-loop", "--runs-dir", str(runs), "--run-id", "r", *extra]
            wall, stages = timed(cmd, work / f"{arm}-{r}.log")
            rows[arm].append(breakdown(wall, stages))
            b = rows[arm][-1]
            print(f"repeat {r} {arm:>7}: {b['wall']:.1f} s wall, {b['stages']:.1f} s in stages, "
                  f"{b['rest']:.1f} s outside ({b['rest'] / b['wall']:.1%})", flush=True)

    med = {arm: {k: statistics.median(b[k] for b in bs) for k in bs[0]} for arm, bs in rows.items()}
    print(f"\nmedian of {args.repeats} interleaved repeat(s); logs in {work}\n")
    print("| command | wall s | in stages s | outside s | outside share | start-up s | between stages s | end s |")
    print("|---|---|---|---|---|---|---|---|")
    for arm, m in med.items():
        spread = [b["rest"] for b in rows[arm]]
        print(f"| {arm} | {m['wall']:.1f} | {m['stages']:.1f} | {m['rest']:.1f} ({min(spread):.1f}-{max(spread):.1f}) "
              f"| {m['rest'] / m['wall']:.1%} | {m['start']:.1f} | {m['gaps']:.1f} | {m['end']:.1f} |")
    cost = med["prefect"]["rest"] - med["plain"]["rest"]
    print(f"\nPrefect's own cost: {cost:.1f} s ({cost / med['prefect']['wall']:.1%} of herl run's wall time); "
          f"outside the stages: herl run {med['prefect']['rest'] / med['prefect']['wall']:.1%}, "
          f"plain loop {med['plain']['rest'] / med['plain']['wall']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
