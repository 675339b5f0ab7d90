"""The learning benchmark script: its summary arithmetic on hand-built curves, and a
small real run of the script (2 modes x 2 seeds x 1 iteration) with its outputs."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.helpers import ROOT, small_overrides

sys.path.insert(0, str(ROOT / "benchmarks"))
import learning  # noqa: E402


def _row(mode, seed, k, reward, **kw):
    base = {"mode": mode, "seed": seed, "iteration": k, "reward": reward, "all_met": 0.0, "stage_seconds": 1.0}
    return {**base, **{col: 0.0 for _, _, col in learning.STATS}, **kw}


def test_summary_means_spreads_and_paired_differences():
    curves = []
    for seed, (g, h) in enumerate([(0.2, 0.3), (0.4, 0.6)]):
        for k in range(4):  # rewards constant over iterations: the tail mean is the value itself
            curves.append(_row("grpo", seed, k, g))
            curves.append(_row("herl", seed, k, h, groups_failed=3.0, bonus_applied=2.0))
    text = learning.summarise(curves, ["grpo", "herl"], last=2)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ")}
    assert rows["3"] == ["0.300 ± 0.141", "0.450 ± 0.212"]  # mean ± sample std over the two seeds
    grpo, herl = rows["grpo"], rows["herl"]
    assert grpo[1] == "0.300 ± 0.141" and grpo[3] == "-"
    # paired by seed: (0.3 - 0.2, 0.6 - 0.4) = (0.1, 0.2)
    assert herl[3] == "+0.150 ± 0.071"
    assert herl[5] == "3.0" and herl[9] == "2.00"


def test_a_mode_is_an_algorithm_and_herl_goals_also_the_goals_wording(tmp_path):
    job = {"config": None, "overrides": {}, "seed": 1,
           "runs_dir": str(tmp_path)}
    goals = learning.run_config({**job, "mode": "herl_goals"})
    herl = learning.run_config({**job, "mode": "herl"})
    assert (goals.algorithm, goals.hindsight.template, goals.run_id, goals.seed) == ("herl", "goals", "herl_goals-seed1", 1)
    assert (herl.algorithm, herl.hindsight.template, herl.run_id) == ("herl", "herl", "herl-seed1")
    assert learning.run_config({**job, "mode": "grpo"}).algorithm == "grpo"


def test_the_script_runs_every_mode_and_seed(tmp_path):
    ov = small_overrides(tmp_path, iterations=1, **{"task.holdout": 2, "evaluation.every": 1})
    sets = [f"{k}={v}" for k, v in ov.items() if k not in ("run_id", "runs_dir", "iterations")]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--modes", "grpo,herl", "--seeds", "0,1",
           "--iterations", "1", "--workers", "2", "--out", str(tmp_path / "out"), "--config",
           str(ROOT / "schemas" / "presets" / "tiny.toml")]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    curves = pq.read_table(tmp_path / "out" / "curves.parquet").to_pylist()
    assert sorted((r["mode"], r["seed"], r["iteration"]) for r in curves) == \
        [(m, s, 0) for m in ("grpo", "herl") for s in (0, 1)]
    assert all(r["revisions"] == 0 and r["hindsight_sequences"] == 0 for r in curves if r["mode"] == "grpo")
    assert any(r["revisions"] > 0 for r in curves if r["mode"] == "herl")
    # the same seed gives both modes the same first rollouts (same prompts, same policy 0)
    first = {(r["mode"], r["seed"]): r["reward"] for r in curves if r["iteration"] == 0}
    assert first[("grpo", 0)] == pytest.approx(first[("herl", 0)])
    assert (tmp_path / "out" / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| grpo |" in report and "| herl |" in report and report in proc.stdout
    # held-out evaluation of policies 0 and 1 (the final one) for every run
    held = pq.read_table(tmp_path / "out" / "heldout.parquet").to_pylist()
    assert sorted((r["mode"], r["seed"], r["policy"]) for r in held) == \
        [(m, s, k) for m in ("grpo", "herl") for s in (0, 1) for k in (0, 1)]
    assert all(0 <= r["round0"] <= 1 and 0 <= r["final"] <= 1 for r in held)
    assert "Held-out prompts" in report
    # finished runs are not run again
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(0 stages run)" in again.stdout and "nothing ran now" in again.stdout, again.stdout


def test_heldout_intervals_are_paired_over_prompts():
    """A policy that follows every instruction the initial one followed plus 30 of 60 more
    prompts: its paired difference's interval excludes 0; an identical policy's is [0, 0]."""
    rows = []
    for k, extra in ((0, 0), (5, 30), (9, 0)):
        for i in range(60):
            met = i < 10 or i < 10 + extra
            rows.append({"mode": "grpo", "seed": 0, "policy": k, "prompt_id": f"p{i}", "all_met_strict": met,
                         "all_met_loose": met, "items_met_strict": 2 if met else 1, "items_met_loose": 2 if met else 1,
                         "items_total": 2})
    table = learning.bootstrap_table(rows, ["grpo"])
    line = {int(r.split("|")[1]): r for r in table.splitlines() if r.startswith("| ") and "grpo" in r}
    assert "| 0.167 [" in line[0] and "| 0.667 [" in line[5]
    low = float(line[5].split("|")[5].split("[")[1].split(",")[0])
    assert low > 0.3  # +0.5 on the same prompts: the interval is far from 0
    assert "+0.000 [+0.000, +0.000]" in line[9]


def test_modes_are_compared_with_grpo_on_the_same_seed_and_prompt():
    """herl answers 30 more of 60 prompts than grpo at policy 5 and the same ones at
    policy 0: its paired difference to grpo is +0.5 with an interval far from 0 at policy 5
    and exactly 0 at policy 0; a prompt only one mode answered is not paired."""
    rows = []
    for mode, k, extra in (("grpo", 0, 0), ("grpo", 5, 0), ("herl", 0, 0), ("herl", 5, 30)):
        for i in range(60 + (mode == "herl")):
            met = i < 10 + extra
            rows.append({"mode": mode, "seed": 0, "policy": k, "prompt_id": f"p{i}", "all_met_strict": met,
                         "all_met_loose": met, "items_met_strict": 2 if met else 1, "items_met_loose": 2 if met else 1,
                         "items_total": 2})
    table = learning.bootstrap_table(rows, ["grpo", "herl"])
    vs = table.split("Against grpo")[1]
    line = {int(r.split("|")[1]): [c.strip() for c in r.split("|")[2:-1]] for r in vs.splitlines() if r.startswith("| ")
            and "herl" in r}
    assert line[0] == ["herl", "60", "+0.000 [+0.000, +0.000]", "+0.000 [+0.000, +0.000]"]
    assert line[5][:2] == ["herl", "60"] and line[5][2].startswith("+0.500 [")
    assert float(line[5][2].split("[")[1].split(",")[0]) > 0.3
    assert line[5][3].startswith("+0.250 [")  # 30 more items of 120
    assert "Against grpo" not in learning.bootstrap_table([r for r in rows if r["mode"] == "herl"], ["herl"])


def test_a_stopped_benchmark_leaves_no_process_behind(tmp_path):
    """SIGTERM while a run trains (two runs side by side, in pool workers): the benchmark
    stops, and nothing it started (pool workers, the train job, multiprocessing's
    helpers) is left running. Every process it started carries a marker in its
    environment; none may remain."""
    workers = 2
    import os
    import signal
    import time
    import uuid

    import psutil

    marker = uuid.uuid4().hex
    ov = small_overrides(tmp_path, iterations=3)
    sets = [x for k, v in ov.items() if k not in ("run_id", "runs_dir", "iterations") for x in ("--set", f"{k}={v}")]
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--modes", "grpo", "--seeds", "0,1", "--iterations",
           "3", "--workers", str(workers), "--out", str(out), "--config", str(ROOT / "schemas" / "presets" / "tiny.toml"),
           *sets]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HERL_TEST_MARKER": marker}, start_new_session=True)

    def marked() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("HERL_TEST_MARKER") == marker:
                    found.append(p)
            except psutil.Error:
                pass
        return found

    try:
        deadline = time.time() + 300
        # a train stage underway: its manifest not yet written, the one before it done
        while not (out / "runs" / "grpo-seed0" / "iter-0" / "_manifests" / "advantages.json").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        while len(marked()) < 2:  # the benchmark and what it started for the train stage
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        left = marked()
        deadline = time.time() + 15
        while left and time.time() < deadline:
            time.sleep(0.2)
            left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [(p.pid, p.cmdline()[:4]) for p in left]
    finally:
        for p in marked():
            p.kill()
        if proc.poll() is None:
            proc.kill()
