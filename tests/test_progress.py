"""Progress lines of long stages: generation with tokens/s, grading, optimizer steps with
the loss; shown on a terminal (or with HERL_PROGRESS=1), silent in logs and CI."""

from __future__ import annotations

from herl.runs.rundir import open_run
from herl.util.progress import Progress
from schemas.config import load_config
from stages import run_iteration
from tests.helpers import small_overrides


def test_silent_off_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("HERL_PROGRESS", raising=False)
    with Progress("grade", 10, "answers") as p:
        p.update(10)
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal


def test_forced_lines_at_each_tenth(capsys, monkeypatch):
    monkeypatch.setenv("HERL_PROGRESS", "1")
    with Progress("grade", 100, "answers") as p:
        for _ in range(100):
            p.update(1, tokens=5)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 11 and lines[0].startswith("grade: 1/100 answers, ") and "tokens/s" in lines[0]
    assert lines[-1].startswith("grade: 100/100 answers")


def test_an_iteration_shows_generation_grading_and_training(tmp_path, capfd, monkeypatch):
    from multiprocessing import forkserver

    monkeypatch.setenv("HERL_PROGRESS", "1")
    # the train job is forked from a fork server, whose stderr is the one it started with:
    # a fresh one, started under this test's capture, so the job's lines are captured too
    forkserver._forkserver._stop()
    run = open_run(load_config(None, small_overrides(tmp_path, iterations=1)))
    run_iteration(run, 0)
    err = capfd.readouterr().err
    assert "generate: 16/16 sequences" in err and "tokens/s" in err  # 4 prompts x 4 answers
    assert "grade: 16/16 answers" in err
    assert "train: 2/2 optimizer steps, loss " in err  # train.mini_batches = 2
