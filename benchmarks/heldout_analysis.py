"""What a reader needs to check the learning benchmark's held-out numbers: the answers,
each graded item, length separated from skill, and intervals that say what they resample.

Used by benchmarks/learning.py; each function takes finished run folders (or the rows read
from them) and returns rows or a markdown table.

- `answer_rows`: one row per (run, evaluated policy, held-out prompt): the first answer's
  text, its word count, every rubric item's kind, arguments and strict / loose verdict
  (graded again here with herl's checks, so a reader can compare with another grader),
  and whether the prompt is *length-aided*.
- `item_rate_rows`: one row per (run, iteration, rubric item kind): the training
  rollouts' met rate, so the training reward can be split by what was asked.
- A prompt is *length-aided* when a shorter answer satisfies one of its items without any
  skill: "no commas", or fewer than N words or sentences (`length_aided`).
- Intervals are cluster bootstraps over prompts (`cluster_ci`): the seeds' held-out sets
  are seeded subsets of one file and share prompts, so the unit resampled is the prompt,
  with all of its (seed) answers. They are conditional on the trained policies: they do
  not cover seed-to-seed training variance, which the per-seed columns show.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

BOOTSTRAP = 2000  # resamples of the cluster bootstrap

# what a shorter answer gets for free: (item kind, relation in its params or None for any)
LENGTH_AIDED = (("punctuation:no_comma", None), ("length_constraints:number_words", "less than"),
                ("length_constraints:number_sentences", "less than"))


def length_aided(rubric: list[dict]) -> bool:
    """Whether a prompt has an item a shorter answer meets without skill (LENGTH_AIDED)."""
    for item in rubric:
        params = json.loads(item.get("params") or "{}")
        for kind, relation in LENGTH_AIDED:
            if item["kind"] == kind and (relation is None or params.get("relation") == relation):
                return True
    return False


def answer_rows(result: dict) -> list[dict]:
    """The held-out first answers of one run (round 0), graded item by item."""
    from herl.data.pool import evaluation_prompts
    from herl.grading.rubric import VerifiableGrader
    from herl.runs.query import query_run
    from herl.runs.rundir import load_run

    run = load_run(result["path"])
    prompts = {p["prompt_id"]: p for p in evaluation_prompts(run.cfg)}
    grader = VerifiableGrader()
    rows = []
    for k, pid, text in query_run(result["path"], """
            select iteration, prompt_id, answer_text from heldout_answers where round = 0
            order by iteration, prompt_id""").fetchall():
        rubric = prompts[pid]["rubric"]
        prompt_text = next((m["content"] for m in reversed(prompts[pid]["messages"]) if m["role"] == "user"), "")
        verdicts = grader.grade(rubric, text, prompt_text)
        strict = [v.strict for v in verdicts]
        loose = [v.loose_verdict for v in verdicts]
        rows.append({"mode": result["mode"], "seed": result["seed"], "policy": k, "prompt_id": pid,
                     "answer_text": text, "words": len(text.split()), "length_aided": length_aided(rubric),
                     "item_kinds": [it["kind"] for it in rubric], "item_params": [it["params"] for it in rubric],
                     "verdicts_strict": strict, "verdicts_loose": loose,
                     "items_total": len(rubric), "items_met_strict": strict.count("met"),
                     "items_met_loose": loose.count("met"), "all_met_strict": all(v == "met" for v in strict),
                     "all_met_loose": all(v == "met" for v in loose)})
    return rows


def item_rate_rows(result: dict) -> list[dict]:
    """Per iteration and rubric item kind, the training rollouts' met rate (rewards' verdicts)."""
    from herl.runs.query import query_run

    out = query_run(result["path"], """
        with kinds as (
            select iteration, prompt_id, generate_subscripts(rubric, 1) - 1 as item_index,
                   unnest(rubric).kind as kind
            from prompts
        )
        select v.iteration, k.kind, count(*) as verdicts, avg((v.verdict = 'met')::int) as met_rate
        from verdicts as v
        join kinds as k using (iteration, prompt_id, item_index)
        group by 1, 2 order by 1, 2""").fetchall()
    return [{"mode": result["mode"], "seed": result["seed"], "iteration": k, "kind": kind, "verdicts": n,
             "met_rate": rate} for k, kind, n, rate in out]


# ---- intervals --------------------------------------------------------------------------

def cluster_ci(rng, clusters: list[str], num: list[float], den: list[float]) -> tuple[float, float, float]:
    """(point, 2.5th, 97.5th percentile) of sum(num) / sum(den) when whole clusters (prompts)
    are resampled with replacement, BOOTSTRAP times; one (num, den) per unit (a seed's
    answer to a prompt)."""
    import numpy as np

    names = sorted(set(clusters))
    at = {c: i for i, c in enumerate(names)}
    n_sum, d_sum = np.zeros(len(names)), np.zeros(len(names))
    for c, a, b in zip(clusters, num, den):
        n_sum[at[c]] += a
        d_sum[at[c]] += b
    idx = rng.integers(0, len(names), size=(BOOTSTRAP, len(names)))  # (BOOTSTRAP, clusters)
    stats = n_sum[idx].sum(axis=1) / np.maximum(d_sum[idx].sum(axis=1), 1e-12)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(n_sum.sum() / max(d_sum.sum(), 1e-12)), float(lo), float(hi)


def _fmt(t: tuple[float, float, float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(t[0])} [{f.format(t[1])}, {f.format(t[2])}]"


def _units(rows: list[dict], mode: str, policy: int, subset=None) -> dict:
    return {(r["seed"], r["prompt_id"]): r for r in rows if r["mode"] == mode and r["policy"] == policy
            and (subset is None or r["length_aided"] == subset)}


def accuracy(rng, got: dict, level: str = "prompt") -> tuple[float, float, float]:
    """Prompt-level (all items met) or instruction-level strict accuracy over `got`'s units."""
    units = sorted(got)
    clusters = [u[1] for u in units]
    if level == "prompt":
        return cluster_ci(rng, clusters, [float(got[u]["all_met_strict"]) for u in units], [1.0] * len(units))
    return cluster_ci(rng, clusters, [float(got[u]["items_met_strict"]) for u in units],
                      [float(got[u]["items_total"]) for u in units])


def paired(rng, got: dict, base: dict, level: str = "prompt") -> tuple[int, tuple[float, float, float] | None]:
    """got - base over the units both hold, clustered by prompt."""
    units = sorted(u for u in got if u in base)
    if not units:
        return 0, None
    clusters = [u[1] for u in units]
    if level == "prompt":
        diffs = [float(got[u]["all_met_strict"]) - float(base[u]["all_met_strict"]) for u in units]
        return len(units), cluster_ci(rng, clusters, diffs, [1.0] * len(units))
    diffs = [float(got[u]["items_met_strict"] - base[u]["items_met_strict"]) for u in units]
    return len(units), cluster_ci(rng, clusters, diffs, [float(got[u]["items_total"]) for u in units])


def per_seed_gain(got: dict, base: dict) -> str:
    """Prompt-level strict gain of got over base, one number per seed."""
    seeds = sorted({u[0] for u in got if u in base})
    out = []
    for s in seeds:
        units = [u for u in got if u[0] == s and u in base]
        out.append(statistics.fmean(float(got[u]["all_met_strict"]) - float(base[u]["all_met_strict"]) for u in units))
    return ", ".join(f"{g:+.3f}" for g in out) or "-"


# ---- tables -----------------------------------------------------------------------------

def tables(rows: list[dict], modes: list[str]) -> str:
    """The held-out tables of results.md: accuracies with cluster-bootstrap intervals and
    per-seed gains, the same with and without length-aided prompts, per instruction kind,
    and answer lengths."""
    import numpy as np

    if not rows:
        return ""
    rng = np.random.default_rng(0)
    policies = sorted({r["policy"] for r in rows})
    first, last = policies[0], policies[-1]
    n_prompts = len({r["prompt_id"] for r in rows})
    n_units = len({(r["seed"], r["prompt_id"]) for r in rows if r["mode"] == modes[0] and r["policy"] == first})
    lines = ["", f"Held-out first answers: {n_units} (seed, prompt) pairs over {n_prompts} distinct prompts. "
                 f"Intervals: 95% cluster bootstrap over prompts ({BOOTSTRAP} resamples, every seed's answer to a "
                 "resampled prompt kept together). They are conditional on the trained policies: they do not "
                 "cover seed-to-seed training variance, which `per seed` shows.", "",
             "| policy | mode | prompt strict | vs policy 0 | per seed | instruction strict | vs policy 0 |",
             "|---:|---|---|---|---|---|---|"]
    for mode in modes:
        base = _units(rows, mode, first)
        for k in policies:
            got = _units(rows, mode, k)
            if not got:
                continue
            vs_p = vs_i = seeds = "-"
            if k != first:
                vs_p = _fmt(paired(rng, got, base)[1], True)
                vs_i = _fmt(paired(rng, got, base, "instruction")[1], True)
                seeds = per_seed_gain(got, base)
            lines.append(f"| {k} | {mode} | {_fmt(accuracy(rng, got))} | {vs_p} | {seeds} "
                         f"| {_fmt(accuracy(rng, got, 'instruction'))} | {vs_i} |")
    others = [m for m in modes if m != "grpo"]
    if "grpo" in modes and others:
        lines += ["", f"Against grpo at policy {last}, the same (seed, prompt) pairs (the same seed trains on the "
                      "same prompts), all prompts and split by length-aided prompts:", "",
                  "| mode | prompts | pairs | prompt strict vs grpo | per seed | instruction strict vs grpo |",
                  "|---|---|---:|---|---|---|"]
        for mode in others:
            for label, subset in (("all", None), ("length-aided", True), ("not length-aided", False)):
                got, base = _units(rows, mode, last, subset), _units(rows, "grpo", last, subset)
                pairs, dp = paired(rng, got, base)
                if pairs:
                    lines.append(f"| {mode} | {label} | {pairs} | {_fmt(dp, True)} | {per_seed_gain(got, base)} "
                                 f"| {_fmt(paired(rng, got, base, 'instruction')[1], True)} |")
    lines += ["", "Length separated from skill: a prompt is *length-aided* when a shorter answer meets one of "
                  "its items without skill (no commas; fewer than N words or sentences). Prompt-level strict "
                  f"accuracy at policy {first} and {last} and the paired gain, on each part:", "",
              "| mode | prompts | pairs | policy " + str(first) + " | policy " + str(last) + " | gain | per seed "
              "| share of prompts gained |", "|---|---|---:|---|---|---|---|---:|"]
    for mode in modes:
        before = _units(rows, mode, first)
        gained_all = sum(1 for u, r in _units(rows, mode, last).items()
                         if r["all_met_strict"] and u in before and not before[u]["all_met_strict"])
        for label, subset in (("length-aided", True), ("not length-aided", False)):
            a, b = _units(rows, mode, first, subset), _units(rows, mode, last, subset)
            if not a or not b:
                continue
            gained = sum(1 for u, r in b.items() if r["all_met_strict"] and u in a and not a[u]["all_met_strict"])
            share = f"{gained / gained_all:.2f}" if gained_all else "-"
            lines.append(f"| {mode} | {label} | {len(b)} | {_fmt(accuracy(rng, a))} | {_fmt(accuracy(rng, b))} "
                         f"| {_fmt(paired(rng, b, a)[1], True)} | {per_seed_gain(b, a)} | {share} |")
    lines += ["", f"Instruction-level strict accuracy by instruction kind, policy {first} -> {last} (all seeds; "
                  "n = items):", "", "| kind | n | " + " | ".join(modes) + " |", "|---|---:|" + "---|" * len(modes)]
    per_kind: dict = defaultdict(lambda: defaultdict(lambda: [0, 0]))  # kind -> (mode, policy) -> [met, n]
    for r in rows:
        for kind, v in zip(r["item_kinds"], r["verdicts_strict"]):
            cell = per_kind[kind][(r["mode"], r["policy"])]
            cell[0] += v == "met"
            cell[1] += 1
    for kind in sorted(per_kind):
        n = per_kind[kind][(modes[0], first)][1]
        cells = []
        for mode in modes:
            a, b = per_kind[kind][(mode, first)], per_kind[kind][(mode, last)]
            cells.append(f"{a[0] / a[1]:.2f} -> {b[0] / b[1]:.2f}" if a[1] and b[1] else "-")
        lines.append(f"| {kind} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "Answer length (whitespace-separated words of the first answers; mean, median):", "",
              "| policy | " + " | ".join(modes) + " |", "|---:|" + "---|" * len(modes)]
    for k in policies:
        cells = []
        for mode in modes:
            words = [r["words"] for r in rows if r["mode"] == mode and r["policy"] == k]
            cells.append(f"{statistics.fmean(words):.1f}, {statistics.median(words):.0f}" if words else "-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def provenance(argv: list[str]) -> dict:
    """What produced a results folder: the command, herl's commit, the machine."""
    import os
    import platform
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    mem = ""
    try:
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"command": "python " + " ".join(argv), "commit": git("rev-parse", "HEAD"),
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
            "machine": {"cpus": os.cpu_count(), "cpu": cpu, "memory": mem, "platform": platform.platform(),
                        "python": sys.version.split()[0]},
            "written": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
