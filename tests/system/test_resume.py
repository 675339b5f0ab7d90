"""A real `herl run` worker is SIGKILLed during a stage and resumed with `herl resume`:
only unfinished stages run again, and the final tables have no duplicate keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from herl.runs.query import query_run
from herl.runs.status import stage_status
from schemas.stages import STAGES
from schemas.tables import TABLES
from tests.helpers import ROOT, small_overrides

pytestmark = pytest.mark.slow


def _herl(*args: str) -> list[str]:
    return [sys.executable, "-m", "herl.commands.cli", *args]


def _set_args(overrides: dict) -> list[str]:
    out = []
    for key, value in overrides.items():
        if key in ("run_id", "runs_dir", "iterations"):
            continue
        out += ["--set", f"{key}={json.dumps(value)}"]
    return out


def _manifest(run_dir, k, stage):
    p = run_dir / f"iter-{k}" / "_manifests" / f"{stage}.json"
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_sigkill_during_a_stage_then_resume(tmp_path):
    runs = tmp_path / "runs"
    # with the held-out evaluation of policies 0 and 2 (the final one), so the flow's whole plan runs
    ov = small_overrides(runs, run_id="killed", **{"task.holdout": 2, "evaluation.every": 2})
    cmd = _herl("run", "--run-id", "killed", "--runs-dir", str(runs), "--iterations", "2", *_set_args(ov))
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = runs / "killed"
    victim = (0, "train")  # the longest stage of iteration 0: load, old log-probs, two steps, save
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            m = _manifest(run_dir, *victim)
            if m and m["status"] == "running":
                break
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.01)
        else:
            pytest.fail("the run never reached the train stage")
        # `herl run` is a supervisor and its worker (in its own session): the worker, which
        # runs the stage, dies at once, as the kernel's OOM killer would end it
        tree = psutil.Process(proc.pid).children(recursive=True)  # worker, Prefect's server, the train job
        assert any("prefect.server" in " ".join(p.cmdline()) for p in tree), [p.cmdline() for p in tree]
        (worker,) = [c for c in psutil.Process(proc.pid).children() if "herl.util.watchdog" not in c.cmdline()]
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == 128 + signal.SIGKILL  # the supervisor reports how its worker ended
    # no process outlives the job: the supervisor terminated what the worker left
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, [p.cmdline() for p in alive]

    status = {(r["iteration"], r["stage"]): r["status"] for r in stage_status(run_dir)}
    assert status[victim] == "interrupted"
    assert [status[(0, s)] for s in ("heldout", *STAGES[:4])] == ["done"] * 5
    assert all(status[(1, s)] == "missing" for s in STAGES) and status[(2, "heldout")] == "missing"
    before = {s: _manifest(run_dir, 0, s) for s in ("heldout", *STAGES[:4])}

    res = subprocess.run(_herl("resume", str(run_dir)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    # finished stages were not run again: same manifests, one attempt each
    for s in ("heldout", *STAGES[:4]):
        assert _manifest(run_dir, 0, s) == before[s], s
    assert _manifest(run_dir, 2, "heldout")["status"] == "done" and not (run_dir / "iter-2" / "rollouts.parquet").exists()
    train0 = _manifest(run_dir, 0, "train")
    assert train0["status"] == "done" and train0["attempts"] == 2
    assert all(_manifest(run_dir, 1, s)["attempts"] == 1 for s in STAGES)
    assert "skipped: manifest current" in res.stdout + res.stderr

    # nothing duplicated or half-written
    for name, spec in TABLES.items():
        keys = ", ".join(spec.key)
        dup = query_run(run_dir, f"SELECT {keys}, count(*) FROM {name} GROUP BY ALL HAVING count(*) > 1").fetchall()
        assert dup == [], name
    assert not list(run_dir.glob("snapshots/.policy-*")) and not list(run_dir.glob("iter-*/.*.tmp"))
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == ["policy-1", "policy-2"]
    out = subprocess.run(_herl("sql", str(run_dir), "SELECT iteration, avg(reward) FROM rewards GROUP BY 1 ORDER BY 1",
                               "--format", "csv"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.splitlines()[1].startswith("0,")

    # the default tracker: every metric of every iteration (the final held-out evaluation
    # included) is in TensorBoard's event files once, although iteration 0 ended in a kill
    from herl.runs.rundir import load_run
    from tests.helpers import expected_points, tensorboard_points

    run = load_run(run_dir)
    want = expected_points(run)
    assert {k for _, k, _ in want} == {0, 1, 2} and tensorboard_points(run) == want
