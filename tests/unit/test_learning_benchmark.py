"""The learning benchmark script: its summary arithmetic on hand-built curves, and a
small real run of the script (2 modes x 2 seeds x 1 iteration) with its outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.helpers import ROOT, small_overrides

sys.path.insert(0, str(ROOT / "benchmarks"))
import heldout_analysis  # noqa: E402
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
    # what a reader checks: the answers with their verdicts, per-item training rates, the command
    answers = pq.read_table(tmp_path / "out" / "heldout_answers.parquet").to_pylist()
    assert len(answers) == 2 * 2 * 2 * 2  # modes x seeds x policies x 2 held-out prompts
    assert all(len(a["verdicts_strict"]) == len(a["item_kinds"]) == a["items_total"] for a in answers)
    assert all(a["words"] == len(a["answer_text"].split()) for a in answers)
    rates = pq.read_table(tmp_path / "out" / "item_rates.parquet").to_pylist()
    toy = {"no_capitals", "no_digits", "include", "char_length", "ends_with", "exclude"}  # the toy task's kinds
    assert rates and {r["kind"] for r in rates} <= toy
    assert all(0 <= r["met_rate"] <= 1 and r["verdicts"] > 0 for r in rates)
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert "benchmarks/learning.py --modes grpo,herl" in prov["command"] and len(prov["commit"]) == 40
    assert report.startswith("Command: `python ") and "cluster bootstrap over prompts" in report
    # finished runs are not run again
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(0 stages run)" in again.stdout and "nothing ran now" in again.stdout, again.stdout


def _answer(mode, seed, k, pid, met, aided=False, words=10):
    return {"mode": mode, "seed": seed, "policy": k, "prompt_id": pid, "all_met_strict": met, "all_met_loose": met,
            "items_met_strict": 2 if met else 1, "items_met_loose": 2 if met else 1, "items_total": 2,
            "length_aided": aided, "words": words, "answer_text": "x " * words,
            "item_kinds": ["punctuation:no_comma" if aided else "keywords:existence", "startend:quotation"],
            "verdicts_strict": ["met", "met" if met else "unmet"], "verdicts_loose": ["met", "met" if met else "unmet"]}


def _lines(table: str, head: str) -> list[list[str]]:
    part = table.split(head, 1)[1].split("\n\n", 2)[1]
    return [[c.strip() for c in r.split("|")[1:-1]] for r in part.splitlines() if r.startswith("| ")
            and not r.startswith("| policy") and not r.startswith("| mode") and not r.startswith("| kind")]


def test_heldout_intervals_are_paired_over_prompts():
    """A policy that follows every instruction the initial one followed plus 30 of 60 more
    prompts: its paired difference's interval excludes 0; an identical policy's is [0, 0]."""
    rows = [_answer("grpo", 0, k, f"p{i}", i < 10 + extra) for k, extra in ((0, 0), (5, 30), (9, 0)) for i in range(60)]
    table = heldout_analysis.tables(rows, ["grpo"])
    line = {int(r[0]): r for r in _lines(table, "Held-out first answers")}
    assert line[0][2].startswith("0.167 [") and line[5][2].startswith("0.667 [")
    assert float(line[5][3].split("[")[1].split(",")[0]) > 0.3  # +0.5 on the same prompts: far from 0
    assert line[9][3] == "+0.000 [+0.000, +0.000]" and line[5][4] == "+0.500"  # one seed: its gain


def test_intervals_resample_prompts_not_seed_prompt_pairs():
    """Two seeds answering the same 40 prompts identically are 40 clusters, not 80 pairs:
    the cluster interval is as wide as one seed's alone (a pair bootstrap would shrink it
    by about 1/sqrt(2))."""
    rng = np.random.default_rng(0)
    units = [(s, f"p{i}") for s in (0, 1) for i in range(40)]
    vals = [float(int(p[1:]) % 3 == 0) for _, p in units]
    both = heldout_analysis.cluster_ci(rng, [p for _, p in units], vals, [1.0] * len(units))
    one = heldout_analysis.cluster_ci(rng, [p for _, p in units[:40]], vals[:40], [1.0] * 40)
    assert both[0] == pytest.approx(one[0])
    assert (both[2] - both[1]) == pytest.approx(one[2] - one[1], rel=0.2)
    assert heldout_analysis.cluster_ci(rng, ["a", "a", "b"], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0])[0] == pytest.approx(2 / 3)


def test_modes_are_compared_with_grpo_and_the_gain_is_split_by_length_aided_prompts():
    """herl answers 30 more of 60 prompts than grpo at policy 5, all of them length-aided
    ones: against grpo it gains +0.5 overall, +1.0 on the length-aided half and 0 on the
    rest; the length table says all of its gained prompts were length-aided."""
    rows = []
    for mode, k in (("grpo", 0), ("grpo", 5), ("herl", 0), ("herl", 5)):
        for i in range(60):
            aided = i >= 30
            rows.append(_answer(mode, 0, k, f"p{i}", mode == "herl" and k == 5 and aided, aided,
                                words=40 if k == 0 else 20))
    table = heldout_analysis.tables(rows, ["grpo", "herl"])
    vs = {r[1]: r for r in _lines(table, "Against grpo")}
    assert vs["all"][2] == "60" and vs["all"][3].startswith("+0.500 [")
    assert vs["length-aided"][3] == "+1.000 [+1.000, +1.000]"
    assert vs["not length-aided"][3] == "+0.000 [+0.000, +0.000]"
    split = {(r[0], r[1]): r for r in _lines(table, "Length separated from skill")}
    assert split[("herl", "length-aided")][5].startswith("+1.000") and split[("herl", "length-aided")][7] == "1.00"
    assert split[("herl", "not length-aided")][7] == "0.00"
    lengths = {r[0]: r[1:] for r in _lines(table, "Answer length")}
    assert lengths["0"] == ["40.0, 40", "40.0, 40"] and lengths["5"] == ["20.0, 20", "20.0, 20"]
    kinds = {r[0]: r for r in _lines(table, "by instruction kind")}
    assert kinds["punctuation:no_comma"][1] == "30"  # the items of that kind at policy 0 (one mode)
    assert kinds["punctuation:no_comma"][2:] == ["1.00 -> 1.00", "1.00 -> 1.00"]
    assert "Against grpo" not in heldout_analysis.tables([r for r in rows if r["mode"] == "herl"], ["herl"])


def test_length_aided_prompts_are_the_ones_a_shorter_answer_meets():
    item = lambda kind, **p: {"kind": kind, "params": json.dumps(p)}  # noqa: E731
    assert heldout_analysis.length_aided([item("punctuation:no_comma")])
    assert heldout_analysis.length_aided([item("startend:quotation"),
                                          item("length_constraints:number_words", num_words=50, relation="less than")])
    assert heldout_analysis.length_aided([item("length_constraints:number_sentences", num_sentences=3,
                                               relation="less than")])
    assert not heldout_analysis.length_aided([item("length_constraints:number_words", num_words=300,
                                                   relation="at least")])
    assert not heldout_analysis.length_aided([item("keywords:existence", keywords=["a"])])


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
