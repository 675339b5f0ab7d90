"""The resident trainer (herl/trainer_service): the same snapshots as a job per iteration,
bit for bit (2 iterations here; 3 checked by hand, full, LoRA and 2 processes); a trainer that died or was killed is replaced from the snapshots on disk; a
redone stage reloads; nothing outlives the run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from herl.runs.rundir import open_run
from herl.trainer_service.client import live_trainer, release_trainers, resident_trainer
from schemas.config import load_config
from stages import run_iteration, run_named_stage
from stages.train import release_trainer
from tests.helpers import small_overrides


def _digests(snapshot: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(snapshot.iterdir())
            if f.suffix in (".safetensors", ".pt")}


def _wait_for_optimizer(snapshot: Path, timeout: float = 60.0) -> None:
    from herl.models.snapshot import optimizer_unsealed

    deadline = time.time() + timeout
    while optimizer_unsealed(snapshot):
        assert time.time() < deadline, f"{snapshot}'s deferred optimizer state was not written in {timeout} s"
        time.sleep(0.1)


def _run(tmp_path: Path, name: str, mode: str, iterations: int = 2, **extra):
    cfg = load_config(None, small_overrides(tmp_path, run_id=name, iterations=iterations,
                                            **{"train.between_iterations": mode, **extra}))
    return open_run(cfg)


def _train(run, upto: int | None = None) -> list[dict]:
    metrics = []
    try:
        with run.lock():
            for k in range(run.cfg.iterations if upto is None else upto):
                run_iteration(run, k)
                from herl.runs.query import query_run

                metrics.append(dict(query_run(run.path, f"select name, value from metrics where stage = 'train' "
                                                        f"and iteration = {k}").fetchall()))
    finally:
        release_trainer(run)
    return metrics


@pytest.mark.parametrize("extra", [{}, {"train.lora.rank": 8}], ids=["full", "lora"])
def test_a_resident_trainer_makes_the_same_snapshots_as_a_job_per_iteration(tmp_path, extra, capsys):
    kept = _run(tmp_path, "keep", "keep", **extra)
    m = _train(kept)
    one_shot = _run(tmp_path, "exit", "exit", **extra)
    _train(one_shot)
    for k in (1, 2):
        assert _digests(kept.snapshot(k)) == _digests(one_shot.snapshot(k)), k
    # what it holds, by part: AdamW keeps two moments per trainable weight (and a step count)
    last = m[-1]
    assert 2 * last["memory_trainable_gb"] <= last["memory_optimizer_gb"] < 2.01 * last["memory_trainable_gb"]
    assert (last["memory_trainable_gb"] < last["memory_weights_gb"]) == bool(extra)  # LoRA: the base is frozen
    from herl.commands.cli import main

    main(["status", str(kept.path)])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("trainer (iteration 1")]
    from herl.runs.status import human_bytes

    assert line and f"AdamW state {human_bytes(last['memory_optimizer_gb'] * 1e9)}" in line[0], line
    # one trainer served both iterations: started once, loaded from disk once
    assert [x["trainer_started"] for x in m] == [1.0, 0.0]
    assert [x["loaded_from_disk"] for x in m] == [1.0, 0.0]
    assert not list(kept.path.glob(".trainer-*"))  # its control folder is not in the run folder
    import tempfile

    assert not [p for p in Path(tempfile.gettempdir()).glob(".trainer-*")
                if json.loads((p / "owner.json").read_text())["pid"] == os.getpid()]  # and went with it


@pytest.mark.slow
def test_two_resident_processes_make_the_same_snapshots(tmp_path):
    extra = {"train.launcher.num_processes": 2}
    kept = _run(tmp_path, "keep", "keep", **extra)  # 2 iterations (3 checked by hand)
    one_shot = _run(tmp_path, "exit", "exit", **extra)
    _train(kept)
    _train(one_shot)
    assert _digests(kept.snapshot(2)) == _digests(one_shot.snapshot(2))


def test_a_killed_trainer_is_replaced_from_the_snapshot_on_disk(tmp_path):
    """SIGKILL the trainer between iterations: the next train stage starts a new one, which
    loads snapshot k; the snapshots match a job per iteration's."""
    kept = _run(tmp_path, "keep", "keep")
    with kept.lock():
        try:
            run_iteration(kept, 0)
            first = live_trainer()
            assert first is not None
            os.killpg(first.job.pid, signal.SIGKILL)
            first.job.wait(timeout=30)
            run_iteration(kept, 1)
            second = live_trainer()
            assert second is not None and second is not first
        finally:
            release_trainers()
    one_shot = _run(tmp_path, "exit", "exit")
    _train(one_shot)
    assert _digests(kept.snapshot(2)) == _digests(one_shot.snapshot(2))


def test_a_redone_train_stage_reloads_snapshot_k(tmp_path):
    """The trainer holds snapshot 1 after iteration 0; iteration 0's train stage redone
    (its snapshot gone, as a failed seal leaves it) asks for snapshot 0 again: the same
    trainer reloads it instead of training on from 1, and makes the same snapshot 1."""
    import shutil

    from herl.runs.query import query_run

    kept = _run(tmp_path, "keep", "keep")
    with kept.lock():
        try:
            run_iteration(kept, 0)
            _wait_for_optimizer(kept.snapshot(1))  # the trainer writes it after the stage
            before, trainer = _digests(kept.snapshot(1)), live_trainer()
            shutil.rmtree(kept.snapshot(1))
            (kept.path / "iter-0" / "_manifests" / "train.json").unlink()
            (kept.path / "iter-0" / "metrics-train.parquet").unlink()
            run_named_stage("train", kept, 0)
            _wait_for_optimizer(kept.snapshot(1))
            assert _digests(kept.snapshot(1)) == before and live_trainer() is trainer
            got = dict(query_run(kept.path, "select name, value from metrics where stage = 'train' and iteration = 0"
                                            " and name in ('loaded_from_disk', 'trainer_started')").fetchall())
            assert got == {"loaded_from_disk": 1.0, "trainer_started": 0.0}
        finally:
            release_trainers()


def test_a_stopped_owner_leaves_no_trainer(tmp_path):
    """release_trainers stops the job and its process group; a trainer whose owner died
    ends by itself (it polls the owner), and its control folder is cleared by the next."""
    kept = _run(tmp_path, "keep", "keep", iterations=1)
    with kept.lock():
        try:
            run_iteration(kept, 0)
            pid = live_trainer().job.pid
            assert psutil.pid_exists(pid)
        finally:
            release_trainers()
    deadline = time.time() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.2)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert live_trainer() is None
    # an owner that is gone: the control folder is stale and removed by the next trainer
    import tempfile

    stale = Path(tempfile.gettempdir()) / ".trainer-stale-test"
    stale.mkdir()
    (stale / "owner.json").write_text(json.dumps({"pid": 2 ** 22 + 7, "host": os.uname().nodename}))
    trainer, started = resident_trainer(kept.cfg, kept.path)
    try:
        assert started and not stale.exists()
    finally:
        release_trainers()


def test_between_iterations_is_not_part_of_the_stage_hash():
    from schemas.config import stage_config_hash

    base = load_config(None, {})
    assert stage_config_hash(base, "train") == stage_config_hash(
        load_config(None, {"train.between_iterations": "exit"}), "train")


def test_a_trainer_killed_during_its_deferred_optimizer_write_costs_one_update(tmp_path, monkeypatch):
    """The resident trainer writes snapshot k + 1's optimizer state after the stage returns.
    Killed then (here: as the stage settles iteration 1's snapshot, with half a state on
    disk), the snapshot's weights stay sealed and its state unsealed; snapshot 1, which the
    update started from, is not pruned (keep_snapshots = 1); the next train stage redoes
    iteration 1's update from it, checks the weights come back bit for bit, seals the
    state, and the run goes on to the snapshots a job per iteration makes."""
    from herl.models.snapshot import (
        OPTIMIZER_FILE,
        OPTIMIZER_PARTIAL,
        optimizer_unsealed,
        snapshot_meta,
    )
    from herl.runs.query import query_run
    from herl.trainer_service.client import ResidentTrainer

    extra = {"train.keep_snapshots": 1}
    kept = _run(tmp_path, "keep", "keep", iterations=3, **extra)
    original = ResidentTrainer.settle

    def killed_while_writing(self, sealed):
        if self._unsettled is not None and self._unsettled[1] == 1:
            os.killpg(self.job.pid, signal.SIGKILL)  # before a byte of the state is written
            self.job.wait(timeout=30)
            original(self, sealed)
            # what a kill halfway through torch.save leaves beside the sealed weights
            (kept.snapshot(2) / OPTIMIZER_PARTIAL).write_bytes(b"PK\x03\x04 half a state")
        else:
            original(self, sealed)

    with kept.lock():
        try:
            monkeypatch.setattr(ResidentTrainer, "settle", killed_while_writing)
            run_iteration(kept, 0)
            run_iteration(kept, 1)
            monkeypatch.setattr(ResidentTrainer, "settle", original)
            assert optimizer_unsealed(kept.snapshot(2)) and not (kept.snapshot(2) / OPTIMIZER_FILE).exists()
            # the snapshot the lost state can be made from keeps its weights and state
            assert not snapshot_meta(kept.snapshot(1)).get("pruned")
            assert (kept.snapshot(1) / OPTIMIZER_FILE).exists()
            release_trainers()
            run_iteration(kept, 2)  # a resumed run: a new trainer
        finally:
            release_trainers()
    assert not optimizer_unsealed(kept.snapshot(2)) and not (kept.snapshot(2) / OPTIMIZER_PARTIAL).exists()
    assert not list((kept.path / "snapshots").glob(".*"))  # the redo's scratch folder is gone
    redo = query_run(kept.path, "select value from metrics where stage = 'train' and iteration = 2 "
                                "and name = 'optimizer_redo_seconds'").fetchall()[0][0]
    assert redo > 0
    one_shot = _run(tmp_path, "exit", "exit", iterations=3, **extra)
    _train(one_shot)
    assert _digests(kept.snapshot(3)) == _digests(one_shot.snapshot(3))
    assert (kept.snapshot(3) / OPTIMIZER_FILE).exists()


def _sealed_snapshot(folder: Path, weights: bytes) -> Path:
    from herl.models.snapshot import seal_snapshot

    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(weights)
    seal_snapshot(folder, {"snapshot_id": f"t/{folder.name}/x", "optimizer_deferred": True})
    return folder


@pytest.mark.parametrize("same", [True, False], ids=["same-weights", "other-weights"])
def test_recovering_a_deferred_optimizer_state_checks_the_weights(tmp_path, monkeypatch, same):
    """The redo's weights must equal the sealed ones, file for file: then its state is
    sealed into the snapshot; else (kernels that are not deterministic) nothing of the
    snapshot changes and the error says how to redo from the update before."""
    import stages.train as train_stage
    from herl.models.snapshot import OPTIMIZER_FILE, optimizer_unsealed, snapshot_problems

    cfg = load_config(None, small_overrides(tmp_path, run_id="r"))
    run = open_run(cfg)
    _sealed_snapshot(run.snapshot(1), b"weights one")

    def redo(run_, k, out_dir, trainer, final_dir=None):  # the update of iteration k = 0, as it came out
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"weights one" if same else b"weights 1.0000001")
        (out_dir / OPTIMIZER_FILE).write_bytes(b"adam")
        (out_dir / "train_metrics.json").write_text("{}")
        return 0, "the test's update"

    monkeypatch.setattr(train_stage, "train_into", redo)
    if same:
        assert train_stage.complete_optimizer(run, 1, None) >= 0
        assert not optimizer_unsealed(run.snapshot(1)) and snapshot_problems(run.snapshot(1)) == []
        assert (run.snapshot(1) / OPTIMIZER_FILE).read_bytes() == b"adam"
    else:
        with pytest.raises(train_stage.OptimizerRedoMismatch, match="model.safetensors differ.*Remove"):
            train_stage.complete_optimizer(run, 1, None)
        assert optimizer_unsealed(run.snapshot(1)) and not (run.snapshot(1) / OPTIMIZER_FILE).exists()
    assert not list(run.snapshot(1).parent.glob(".*"))
