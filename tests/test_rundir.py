"""Training at users' sizes, the parts a CPU can check: float32 master weights under a
bfloat16 model dtype, mixed precision, gradient checkpointing, and log-probs computed
without (B, L, V) logits."""

from __future__ import annotations

import json

import pytest

from herl.runs.rundir import open_run
from schemas.config import load_config
from stages import run_iteration, train
from tests.helpers import small_overrides


def test_snapshots_are_pruned_and_the_run_still_verifies(tmp_path):
    from herl.models.snapshot import SnapshotPrunedError, snapshot_meta
    from herl.runs.rundir import fingerprint, load_run

    cfg = load_config(None, small_overrides(tmp_path, iterations=4, **{
        "train.keep_snapshots": 2, "train.keep_every": 0, "task.num_prompts": 8}))
    run = open_run(cfg)
    ids = {}
    for k in range(4):
        run_iteration(run, k)
        ids[k + 1] = fingerprint(run.snapshot(k + 1))
    snaps = {j: run.snapshot(j) for j in range(1, 5)}
    # policies 1 and 2: tombstones (metadata only); 3: kept, without optimizer state; 4: whole
    for j in (1, 2):
        assert snapshot_meta(snaps[j])["pruned"] and sorted(p.name for p in snaps[j].iterdir()) == ["herl_snapshot.json"]
    assert (snaps[3] / "model.safetensors").exists() and not (snaps[3] / "optimizer.pt").exists()
    assert (snaps[4] / "optimizer.pt").exists()
    assert {j: fingerprint(snaps[j]) for j in snaps} == ids  # ids survive pruning: manifests still verify
    # a resume finds every stage current
    again = load_run(run.path)
    assert all(m["skipped"] for k in range(4) for m in run_iteration(again, k).values())
    # a stage that must be redone from a pruned snapshot says so instead of training something else
    def fail(k):  # as a killed attempt leaves it
        m = again.read_manifest(k, "train")
        again.manifest_path(k, "train").write_text(json.dumps({**m, "status": "failed"}))

    fail(1)
    with pytest.raises(SnapshotPrunedError, match="policy-1.*keep_snapshots"):
        train.run(again, 1)
    fail(3)  # policy-3 kept its weights (one of the newest two) but not its AdamW state
    with pytest.raises(SnapshotPrunedError, match="optimizer"):
        train.run(again, 3)
    # nothing was deleted by the refusals
    assert (snaps[3] / "model.safetensors").exists() and (snaps[4] / "optimizer.pt").exists()
