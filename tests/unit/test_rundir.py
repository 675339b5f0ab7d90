"""The run folder (herl/runs/rundir.py): snapshots pruned by train.keep_snapshots /
keep_every while every manifest still verifies, and a stage that must be redone from a
pruned snapshot says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from herl.runs.rundir import open_run
from schemas.config import load_config
from stages import run_iteration, train
from tests.helpers import small_overrides


def test_snapshots_are_pruned_and_the_run_still_verifies(tmp_path):
    from herl.models.snapshot import SnapshotPrunedError, snapshot_meta
    from herl.runs.rundir import fingerprint, load_run

    cfg = load_config(None, small_overrides(tmp_path, iterations=3, **{
        "train.keep_snapshots": 2, "train.keep_every": 0, "task.num_prompts": 8}))
    run = open_run(cfg)
    ids = {}
    for k in range(3):
        run_iteration(run, k)
        ids[k + 1] = fingerprint(run.snapshot(k + 1))
    snaps = {j: run.snapshot(j) for j in range(1, 4)}
    # policy 1: a tombstone (metadata only); 2: kept, without optimizer state; 3: whole
    assert snapshot_meta(snaps[1])["pruned"] and sorted(p.name for p in snaps[1].iterdir()) == ["herl_snapshot.json"]
    assert (snaps[2] / "model.safetensors").exists() and not (snaps[2] / "optimizer.pt").exists()
    assert (snaps[3] / "optimizer.pt").exists()
    assert {j: fingerprint(snaps[j]) for j in snaps} == ids  # ids survive pruning: manifests still verify
    # a resume finds every stage current
    again = load_run(run.path)
    assert all(m["skipped"] for k in range(3) for m in run_iteration(again, k).values())
    # a stage that must be redone from a pruned snapshot says so instead of training something else
    def fail(k):  # as a killed attempt leaves it
        m = again.read_manifest(k, "train")
        again.manifest_path(k, "train").write_text(json.dumps({**m, "status": "failed"}))

    fail(1)
    with pytest.raises(SnapshotPrunedError, match="policy-1.*keep_snapshots"):
        train.run(again, 1)
    fail(2)  # policy-2 kept its weights (one of the newest two) but not its AdamW state
    with pytest.raises(SnapshotPrunedError, match="optimizer"):
        train.run(again, 2)
    # nothing was deleted by the refusals
    assert (snaps[2] / "model.safetensors").exists() and (snaps[3] / "optimizer.pt").exists()


@pytest.mark.parametrize("keep_snapshots,keep_every,kept", [
    (2, 0, [6, 7, 8]),
    (None, 0, list(range(1, 9))),
    (1, 3, [3, 6, 7, 8]),
    (3, 4, [4, 5, 6, 7, 8]),
])
def test_which_snapshots_keep_their_weights(keep_snapshots, keep_every, kept):
    """The pruning rule alone: with snapshot 7 the newest of a run of 8 iterations, the
    newest keep_snapshots, every keep_every-th and the final (8) keep their weights."""
    from herl.runs.rundir import keeps_weights

    assert [j for j in range(1, 9) if keeps_weights(j, 7, 8, keep_snapshots, keep_every)] == kept


def test_a_finished_run_leaves_no_lock_file_and_the_lock_still_excludes(tmp_path):
    """The lock file goes when the lock is let go (a finished run left `.lock` behind);
    another process holding the run is still refused, and after it the run locks again."""
    import subprocess
    import sys

    from herl.runs.rundir import RunLockedError

    run = open_run(load_config(None, small_overrides(tmp_path)))
    with run.lock():
        assert (run.path / ".lock").exists()
    assert not (run.path / ".lock").exists()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from herl.runs.rundir import load_run\n"
        f"run = load_run({str(run.path)!r})\n"
        "with run.lock():\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.readline()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run.is_locked()
        with pytest.raises(RunLockedError):
            with run.lock():
                pass
    finally:
        holder.communicate("\n", timeout=60)
    assert not run.is_locked() and not (run.path / ".lock").exists()
    with run.lock():  # free again: this process takes it
        assert (run.path / ".lock").exists()
    assert not (run.path / ".lock").exists()
