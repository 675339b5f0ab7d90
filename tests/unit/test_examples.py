"""The examples/ folder works as the README shows it: the prompts file loads and mixes
verifiable checks, judge items and a pitfall; both configs load; `herl grade` with the
local judge backend grades the example answers end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq

from tests.helpers import ROOT

EXAMPLES = ROOT / "examples"


def test_the_example_prompts_mix_checks_judge_items_and_a_pitfall():
    from herl.data.importers import load_prompts

    rows = load_prompts(EXAMPLES / "prompts.jsonl")
    kinds = [it["kind"] for r in rows for it in r["rubric"]]
    assert len(rows) == 4 and "judge" in kinds and any(k != "judge" for k in kinds)
    assert any(it["weight"] < 0 for r in rows for it in r["rubric"])  # a pitfall
    # the README's example row is the file's first row
    readme = (ROOT / "README.md").read_text().split("## Your own task", 1)[1]
    shown = json.loads(readme.split("```json\n", 1)[1].split("```", 1)[0])
    assert shown == json.loads((EXAMPLES / "prompts.jsonl").read_text().splitlines()[0])


def test_the_example_configs_load_and_name_the_example_prompts():
    from schemas.config import load_config

    for name in ("local_judge.toml", "served_judge.toml"):
        cfg = load_config(EXAMPLES / name)
        assert (ROOT / cfg.task.source).exists() and cfg.task.source == "examples/prompts.jsonl"
    assert load_config(EXAMPLES / "local_judge.toml").grade.judge.backend == "local"
    served = load_config(EXAMPLES / "served_judge.toml").grade.judge
    assert served.backend == "openai" and served.base_url == "http://127.0.0.1:8000/v1"


def test_herl_grade_with_the_local_judge_backend_grades_the_example_answers(tmp_path):
    """The judge path with no server and no key: the example config's local backend (on
    the tiny model, so the test is fast: it cannot answer in the judge's format, so its
    items end `unknown`, and are counted as such), the checks graded as written."""
    out = tmp_path / "graded.parquet"
    proc = subprocess.run([sys.executable, "-m", "herl.commands.cli", "grade", "--input", str(EXAMPLES / "answers.jsonl"),
                           "--output", str(out), "--config", str(EXAMPLES / "local_judge.toml"),
                           "--set", "grade.judge.model=builtin:tiny", "--set", "grade.judge.max_tokens=8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = pq.read_table(out).to_pylist()
    by_item = {(r["prompt_id"], r["item_id"]): r for r in rows}
    assert len(rows) == 12
    judged = [r for r in rows if r["grader"].startswith("judge:local:")]
    assert len(judged) == 4 and all(r["verdict_strict"] in ("met", "unmet", "unknown") for r in judged)
    unknown = sum(r["verdict_strict"] == "unknown" for r in judged)
    assert f"unknown_items              {unknown}" in proc.stdout
    if unknown:  # why: the first reason, said on the terminal (the column holds every one)
        first = next(r["detail"] for r in rows if r["verdict_strict"] == "unknown")
        assert f"  first unknown verdict: {first[:300]}" in proc.stdout
    for key in [("lighthouse", "short"), ("lighthouse", "no_comma"), ("recipe", "bullets"), ("recipe", "ending"),
                ("capital", "answer"), ("capital", "lowercase"), ("haiku", "title"), ("haiku", "lines")]:
        assert by_item[key]["verdict_strict"] == "met", (key, by_item[key]["detail"])


def test_a_reward_written_in_python_grades_a_run(tmp_path):
    """examples/python_reward.py registers the `mentions` check; the run of
    examples/python_reward.toml (as the README shows it, with PYTHONPATH=examples) grades
    its items with it, and `herl sql` shows each verdict with the check's detail."""
    import os

    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "herl.commands.cli", "run", "examples/python_reward.toml",
                           "--runs-dir", str(runs)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sql = subprocess.run([sys.executable, "-m", "herl.commands.cli", "sql", str(runs / "python-reward"),
                          "SELECT item_id, verdict, detail FROM verdicts WHERE item_id = 'berries'", "--format", "json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    rows = [json.loads(line) for line in sql.stdout.splitlines()]
    assert rows and all(r["detail"].startswith("mentions ") and r["verdict"] in ("met", "unmet") for r in rows), rows[:3]
