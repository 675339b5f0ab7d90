"""A hostile user: bad config and prompt files, a damaged run folder, a full or read-only
disk, Ctrl-C and SIGTERM. Each user error is one message naming what is wrong (file, line,
field or path), exit status 2 and no traceback; a failed start leaves no run folder; after
a recoverable fault, `herl resume` ends with tables identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import TemporaryServer
from herl.runs.rundir import load_run
from herl.runs.status import stage_status
from stages import run_iteration
from tests.helpers import ROOT, small_overrides

RUN_ID = "t"  # the run id of the shared done_run (conftest.py): tables carry it
TABLE_FILES = ("prompts", "rollouts", "verdicts", "rewards", "hindsight", "hindsight_verdicts", "batch")


def _herl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "herl.commands.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _set_args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() if k not in ("run_id", "runs_dir", "iterations")
            for a in ("--set", f"{k}={json.dumps(v)}")]


def _assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])


def _assert_same_tables(run_dir: Path, reference: Path) -> None:
    """Every table of every iteration, and the final weights, byte for byte."""
    for k in (0, 1):
        for name in TABLE_FILES:
            a, b = run_dir / f"iter-{k}" / f"{name}.parquet", reference / f"iter-{k}" / f"{name}.parquet"
            assert a.read_bytes() == b.read_bytes(), f"iteration {k} {name}"
    final = sorted(p.name for p in (reference / "snapshots" / "policy-2").glob("*.safetensors"))  # LoRA: the adapter
    assert final
    for name in final:
        f = f"snapshots/policy-2/{name}"
        assert (run_dir / f).read_bytes() == (reference / f).read_bytes(), f


@pytest.fixture
def finished(done_run) -> Path:
    """An uninterrupted two-iteration run (the shared done_run): what every recovered run must equal."""
    return done_run.path


@pytest.fixture
def tmpfs(tmp_path):
    """A 5 MB tmpfs (a disk that fills); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---- bad input: one message, exit 2, no traceback, no run folder ----------------------

def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """{case: (herl run arguments, what the message must name)}."""
    (tmp / "syntax.toml").write_text('seed = 1\n[train\nlearning_rate = 1e-6\n')
    (tmp / "unknown.toml").write_text("[train]\nlearnin_rate = 1e-6\n")
    (tmp / "latin1.toml").write_bytes(b'seed = 1\nrun_id = "caf\xe9"\n')
    good = {"prompt_id": "a", "messages": [{"role": "user", "content": "Hi."}],
            "rubric": [{"item_id": "x", "kind": "punctuation:no_comma"}]}
    (tmp / "rows.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "prompt_id": "b", "rubric": []}) + "\n")
    (tmp / "latin1.jsonl").write_bytes((json.dumps(good) + "\n").encode() * 2 + b'{"prompt_id": "\xe9"}\n')
    return {
        "toml syntax": ([str(tmp / "syntax.toml")], ["syntax.toml", "line 2"]),
        "unknown key": ([str(tmp / "unknown.toml")], ["unknown.toml", "train.learnin_rate"]),
        "negative size": (["--set", "task.prompts_per_iteration=-4"], ["--set task.prompts_per_iteration=-4"]),
        "not KEY=VALUE": (["--set", "rollout.n"], ["--set expects KEY=VALUE", "'rollout.n'"]),
        "config not UTF-8": ([str(tmp / "latin1.toml")], ["latin1.toml", "line 2", "byte offset 22"]),
        "prompt row": (["--set", f"task.source={tmp / 'rows.jsonl'}"], ["rows.jsonl line 2", "'rubric'"]),
        "prompts not UTF-8": (["--set", f"task.source={tmp / 'latin1.jsonl'}"], ["latin1.jsonl", "line 3"]),
        "no model": (["--model-path", str(tmp / "nowhere")], ["model.path", "nowhere"]),
        "infinite rate": (["--set", "train.learning_rate=inf"], ["train.learning_rate", "finite number"]),
        "password in URL": (["--set", "grade.judge.base_url=http://user:PASSWORD@host/v1"],
                            ["grade.judge.base_url", "user name or password", "hidden"]),
        "key as variable": (["--set", "grade.judge.api_key_env=sk-proj-4f9a8b7c"],
                            ["grade.judge.api_key_env", "environment variable", "hidden"]),
    }


# through the real command (supervisor and worker): the whole output has no traceback
@pytest.mark.parametrize("case", ["toml syntax", "prompt row", "no model"])
def test_bad_input_is_one_message_and_leaves_nothing(tmp_path, case):
    args, needles = _bad_inputs(tmp_path)[case]
    runs = tmp_path / "runs"
    t0 = time.perf_counter()
    proc = _herl("run", *args, "--runs-dir", str(runs), "--run-id", "bad")
    _assert_user_error(proc, *needles)
    assert not runs.exists(), "a failed start left a run folder"
    assert time.perf_counter() - t0 < 60  # found before Prefect's server starts


# the rest in this process (as the worker runs it): exit 2, the message, no run folder
@pytest.mark.parametrize("case", ["unknown key", "negative size", "not KEY=VALUE", "config not UTF-8",
                                  "prompts not UTF-8", "infinite rate", "password in URL", "key as variable"])
def test_bad_input_in_process(tmp_path, case, capsys, monkeypatch):
    from herl.commands.cli import main
    from herl.commands.supervise import SUPERVISED_ENV

    monkeypatch.setenv(SUPERVISED_ENV, "1")
    args, needles = _bad_inputs(tmp_path)[case]
    runs = tmp_path / "runs"
    assert main(["run", *args, "--runs-dir", str(runs), "--run-id", "bad"]) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), (needles, err)
    assert "PASSWORD" not in err and "sk-proj" not in err  # a credential is never echoed
    assert not runs.exists()


def test_a_diverging_update_fails_the_stage_and_saves_nothing(tmp_path):
    """A learning rate that overflows the weights (finite, so the config takes it): the
    train stage fails with one message naming the iteration and the fix; no snapshot."""
    from herl.runs.rundir import open_run
    from schemas.config import load_config
    from schemas.errors import UserError

    run = open_run(load_config(None, small_overrides(tmp_path, **{"train.learning_rate": 1e30,
                                                                   "train.max_grad_norm": 0.0})))
    with pytest.raises(UserError, match=r"iteration 0: .*not finite.*no snapshot was saved. Lower train.learning_rate"):
        run_iteration(run, 0)
    assert not run.snapshot(1).exists()
    assert run.read_manifest(0, "train")["status"] != "done"


def test_export_names_the_policies_it_has(finished, tmp_path, capsys):
    from herl.commands.cli import main

    assert main(["export", str(finished), str(tmp_path / "out"), "--iteration", "7"]) == 2
    err = capsys.readouterr().err
    assert "policy 7 has no weights to export (policies with weights: 0, " in err and "Traceback" not in err
    (tmp_path / "a-file").write_text("x")  # a destination under a file cannot be made, even by root
    assert main(["export", str(finished), str(tmp_path / "a-file" / "out")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'a-file' / 'out'}: " in err and "Errno" not in err


def test_debug_shows_the_traceback(tmp_path):
    proc = _herl("--debug", "run", "--set", "rollout.n=1", "--runs-dir", str(tmp_path / "runs"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_a_read_only_run_folder_is_refused_before_anything_starts(tmpfs):
    assert subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)]).returncode == 0
    proc = _herl("run", "--runs-dir", str(tmpfs / "runs"), "--run-id", "ro")
    _assert_user_error(proc, "read-only file system", str(tmpfs / "runs" / "ro"))


# ---- a damaged run folder --------------------------------------------------------------

def test_damaged_state_shows_as_corrupt_and_resume_rebuilds_it(finished, tmp_path):
    run_dir = tmp_path / RUN_ID
    shutil.copytree(finished, run_dir)
    (run_dir / "iter-0" / "_manifests" / "grade.json").write_text('{"status": "do')  # a torn manifest
    (run_dir / "iter-1" / "batch.parquet").unlink()  # an output of a stage marked done
    weights = run_dir / "snapshots" / "policy-1" / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])  # a bad safetensors header
    rewards = run_dir / "iter-1" / "rewards.parquet"
    rewards.write_bytes(rewards.read_bytes()[:300])  # a truncated table

    status = {(r["iteration"], r["stage"]): r for r in stage_status(run_dir)}
    for key in ((0, "grade"), (0, "train"), (1, "grade"), (1, "advantages")):
        assert status[key]["status"] == "corrupt", (key, status[key])
    assert "batch.parquet is missing" in status[(1, "advantages")]["error"]
    shown = _herl("status", str(run_dir))
    assert shown.returncode == 0 and shown.stdout.count(" corrupt ") == 4

    _assert_user_error(_herl("sql", str(run_dir), "SELECT count(*) FROM rewards"),
                       "table rewards", "iter-1/rewards.parquet", f"herl resume {run_dir}")
    assert _herl("sql", str(run_dir), "SELECT count(*) FROM rollouts").returncode == 0  # other tables still answer

    run = load_run(run_dir)
    redone = {(k, s): m["skipped"] for k in (0, 1) for s, m in run_iteration(run, k).items()}
    assert not redone[(0, "grade")] and not redone[(0, "train")] and not redone[(1, "advantages")]
    assert redone[(0, "rollout")] and redone[(1, "rollout")]  # what verified was kept
    assert all(r["status"] == "done" for r in stage_status(run_dir))
    _assert_same_tables(run_dir, finished)


def test_damaged_initial_weights_name_the_file_and_the_fix(tmp_path):
    from herl.models.paths import DamagedModelError, resolve_model_path
    from herl.models.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(DamagedModelError, match="model.safetensors is damaged.*restore"):
        resolve_model_path(str(model))


# ---- disks and signals (through `herl run` / `herl resume`) ----------------------------

@pytest.mark.slow
def test_a_full_disk_stops_the_run_resumably(finished, tmpfs):
    """5 MB hold iteration 0's tables but not its snapshot with its optimizer state: the run
    stops with the path it could not write (the snapshot, or, once the sealed weights fit
    and the trainer's deferred optimizer write filled the disk, the next file), nothing is
    half-written, the run resumes once there is room (redoing the update whose optimizer
    state was lost), and ends as if nothing had happened."""
    from herl.models.snapshot import snapshot_problems

    args = ["--runs-dir", str(tmpfs), "--run-id", RUN_ID, "--iterations", "2", *_set_args(small_overrides(tmpfs))]
    proc = _herl("run", *args)
    _assert_user_error(proc, "no space left on device while writing", str(tmpfs / RUN_ID))
    for snap in (tmpfs / RUN_ID / "snapshots").iterdir():  # nothing half-written: each one verifies
        assert not snap.name.startswith(".") and snapshot_problems(snap) == [], snap
    assert subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)]).returncode == 0
    res = _herl("resume", str(tmpfs / RUN_ID))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _assert_same_tables(tmpfs / RUN_ID, finished)


def _stop_at(proc: subprocess.Popen, run_dir: Path, stage: tuple[int, str], signum: int, log: Path):
    """Send `signum` to the job's process group (Ctrl-C's way) once `stage` is running;
    (the seconds the run then took to stop, every process it had started)."""
    import psutil

    _wait_running(proc, run_dir, stage, log)
    tree = psutil.Process(proc.pid).children(recursive=True)  # worker, Prefect's server, the stage's job
    assert any("prefect.server" in " ".join(p.cmdline()) for p in tree), [p.cmdline() for p in tree]
    t0 = time.perf_counter()
    os.killpg(proc.pid, signum)
    proc.wait(timeout=90)
    return time.perf_counter() - t0, tree


def _wait_running(proc: subprocess.Popen, run_dir: Path, stage: tuple[int, str], log: Path) -> None:
    manifest = run_dir / f"iter-{stage[0]}" / "_manifests" / f"{stage[1]}.json"
    deadline = time.time() + 300
    while not (manifest.exists() and '"running"' in manifest.read_text()):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)


@pytest.mark.slow
def test_ctrl_c_sigterm_and_hang_ups_stop_in_seconds_and_resume_identically(finished, tmp_path):
    """One run stopped three ways, each while a stage runs, then resumed to the end:
    Ctrl-C (SIGINT) during train; under nohup (SIGHUP inherited as ignored) a hang-up
    changes nothing, the run goes on to the next iteration, where SIGTERM stops it; a
    closed terminal's SIGHUP stops it as SIGTERM does (exit 129). Each time: within
    seconds, the resume line, no traceback, no process left; the final tables are those
    of a run never stopped."""
    import psutil

    runs = tmp_path / "runs"
    run_dir = runs / RUN_ID
    args = ["--runs-dir", str(runs), "--run-id", RUN_ID, "--iterations", "2", *_set_args(small_overrides(runs))]
    stops = ((["run", *args], None, (0, "train"), signal.SIGINT, signal.SIG_DFL),
             (["resume", str(run_dir)], (0, "train"), (1, "rollout"), signal.SIGTERM, signal.SIG_IGN),
             (["resume", str(run_dir)], None, (1, "rollout"), signal.SIGHUP, signal.SIG_DFL))
    for command, hang_up_at, stage, signum, on_hup in stops:
        log = tmp_path / f"{signum}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "herl.commands.cli", *command], cwd=ROOT, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=lambda h=on_hup: signal.signal(signal.SIGHUP, h))
            if hang_up_at is not None:  # nohup: the hang-up is ignored and the run reaches `stage`
                _wait_running(proc, run_dir, hang_up_at, log)
                os.killpg(proc.pid, signal.SIGHUP)
            seconds, tree = _stop_at(proc, run_dir, stage, signum, log)
        out = log.read_text()
        # the first signal stops it (3-13 s measured, Prefect's shutdown included): before the
        # supervisor's resend at 20 s (herl.commands.supervise.RESEND_S), which a lost first one needs
        assert seconds < 20, (seconds, out[-3000:])
        assert proc.returncode == 128 + signum, out[-3000:]
        assert f"Resume with: herl resume {run_dir}" in out and "Traceback" not in out, out[-3000:]
        # said once, calmly: no Prefect ERROR line (its crash report) before herl's own line
        before = out.split("Resume with:")[0]
        assert "| ERROR " not in before and "Crash detected" not in before, out[-3000:]
        assert not load_run(run_dir).is_locked()
        status = {(r["iteration"], r["stage"]): r["status"] for r in stage_status(run_dir)}
        assert status[stage] == "failed"
        _, alive = psutil.wait_procs(tree, timeout=15)  # nothing outlives the command
        assert not alive, [p.cmdline() for p in alive]
    res = _herl("resume", str(run_dir))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _assert_same_tables(run_dir, finished)


def test_a_closed_pipe_is_no_error_and_status_speaks_json(finished):
    """`herl sql RUN ... | head -1`: the reader leaves early; herl exits 0, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "herl.commands.cli", "sql", str(finished),
                             "SELECT * FROM verdicts CROSS JOIN verdicts AS again", "--format", "csv"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().startswith(b"run_id,")
    proc.stdout.close()  # as `head -1` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]
    rows = [json.loads(line) for line in _herl("status", str(finished), "--json").stdout.splitlines()]
    assert len(rows) == 10 and {r["status"] for r in rows} == {"done"}
    assert set(rows[0]) == {"iteration", "stage", "status", "rows", "seconds", "attempts", "error"}


def test_a_stop_signal_whose_exception_was_dropped_still_stops_the_train_wait(monkeypatch):
    """The worker's handlers note the signal: if its exception is lost (Python drops one that
    lands in a __del__), the train stage's wait raises it within half a second and stops
    the job's process group."""
    import subprocess

    from herl.training.launcher import wait_for_job
    from herl.util import procs

    monkeypatch.setattr(procs, "_stop_signals", [])
    job = subprocess.Popen(["sleep", "60"], start_new_session=True)
    procs.note_stop(signal.SIGTERM)  # the handler ran; its SystemExit never arrived
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        wait_for_job(job, None)
    assert exc.value.code == 128 + signal.SIGTERM and time.monotonic() - t0 < 5
    assert job.poll() is not None  # the job was stopped with it
    monkeypatch.setattr(procs, "_stop_signals", [signal.SIGINT])
    with pytest.raises(KeyboardInterrupt):
        procs.raise_if_stop_requested()


# ---- herl sql: bounded, stoppable, and never a part of a damaged table ------------------

@pytest.mark.parametrize("query", ["SELECT count(*) FROM query_table('rewards')",
                                   "SELECT count(*) FROM query('SELECT * FROM rewards')",
                                   "SELECT count(*) FROM rewards"])
def test_every_way_of_naming_a_damaged_table_is_refused(finished, tmp_path, query, capsys):
    from herl.commands.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    f = run / "iter-0" / "rewards.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    assert main(["sql", str(run), query]) == 2
    err = capsys.readouterr().err
    assert "table rewards:" in err and "cannot be read" in err and f"herl resume {run}" in err


def test_sql_is_stopped_by_ctrl_c_its_time_limit_and_its_memory_limit(finished):
    cross = "SELECT count(*) FROM rollouts a, rollouts b, rollouts c, rollouts d, rollouts e, rollouts f, rollouts g"
    # a terminal's Ctrl-C: SIGINT at its default (a background job inherits it ignored)
    proc = subprocess.Popen([sys.executable, "-m", "herl.commands.cli", "sql", str(finished), cross, "--timeout", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(6)  # the query is running (imports take a few seconds)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert time.perf_counter() - t0 < 5, "Ctrl-C did not stop the query at once"
    assert proc.returncode == 130 and "the query was stopped by Ctrl-C" in err and "Traceback" not in err
    assert subprocess.run(["pgrep", "-f", "herl.runs.query"], capture_output=True).returncode == 1  # no query left

    timed = _herl("sql", str(finished), cross, "--timeout", "1")
    assert timed.returncode == 2 and "stopped after 1 s, its time limit" in timed.stderr
    big = "SELECT repeat(a.rollout_id, 100000) || b.rollout_id AS x FROM rollouts a, rollouts b ORDER BY x LIMIT 1"
    mem = _herl("sql", str(finished), big, "--memory-limit", "0.02")
    assert mem.returncode == 2 and "needs more memory than its limit of 0.02 GiB" in mem.stderr


@pytest.mark.parametrize("plugin,needle", [("no_such_plugin_mod", "cannot import plugin module 'no_such_plugin_mod'"),
                                           ("../../etc/passwd", "is not a module name"),
                                           ("herl_raising_plugin", "raised ZeroDivisionError when imported")])
def test_plugins_are_checked_before_the_flow_starts(tmp_path, plugin, needle):
    (tmp_path / "herl_raising_plugin.py").write_text("1 / 0\n")
    runs = tmp_path / "runs"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "herl.commands.cli", "run", "--runs-dir", str(runs), "--run-id", "p",
                           "--set", f"plugins={json.dumps([plugin])}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    _assert_user_error(proc, needle)
    # Prefect's temporary server starts beside the checks; the flow never does
    assert time.perf_counter() - t0 < 30 and "Beginning flow run" not in proc.stdout + proc.stderr
    assert not runs.exists()


@pytest.mark.slow
def test_a_stop_while_prefect_starts_names_no_folder_to_resume(tmp_path):
    runs = tmp_path / "runs"
    log = tmp_path / "early.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "herl.commands.cli", "run", "--runs-dir", str(runs), "--run-id", "early"],
                                cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while TemporaryServer.MARKER not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=90)
    out = log.read_text()
    # the stop lands during the pre-flight checks or while the server comes up (seconds);
    # the run folder is made after both
    assert not (runs / "early").exists()
    assert "before the run started; nothing was written" in out and "Resume with" not in out, out[-3000:]
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in out, out[-3000:]


def test_status_says_what_resume_will_redo_after_the_config_changed(finished, tmp_path):
    """config.json edited by hand (a grading setting): herl status marks the grade stages
    stale, as resume will redo them, not done."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["grade"]["mode"] = "loose"
    (run_dir / "config.json").write_text(json.dumps(cfg))
    rows = {(r["iteration"], r["stage"]): r for r in stage_status(run_dir)}
    assert rows[(0, "grade")]["status"] == "stale" and "`herl resume` redoes it" in rows[(0, "grade")]["error"]
    assert rows[(0, "rollout")]["status"] == "done"  # rollouts do not depend on grading


@pytest.mark.slow
def test_a_moved_run_resumes_as_the_same_run(finished, tmp_path):
    """A run folder copied under another name: resuming it redoes one damaged stage and
    writes the run's own id (config.json's), so every table ends as the original's, and
    a second resume of a run in use is refused at once."""
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(finished, moved)
    (moved / "iter-1" / "hindsight.parquet").unlink()  # one stage to redo, and all that follows from it
    res = _herl("resume", str(moved))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _assert_same_tables(moved, finished)
    assert json.loads((moved / "config.json").read_text())["run_id"] == RUN_ID
    from herl.runs.rundir import load_run as _load

    run = _load(moved)
    with run.lock():
        t0 = time.perf_counter()
        busy = _herl("resume", str(moved))
        _assert_user_error(busy, "is in use")
        assert time.perf_counter() - t0 < 30
        # `herl run` naming the run in use: refused as fast (it took 98 s, after Prefect started)
        t0 = time.perf_counter()
        again = _herl("run", "--runs-dir", str(moved.parent), "--run-id", moved.name)
        _assert_user_error(again, "is in use")
        assert time.perf_counter() - t0 < 30 and "Beginning flow run" not in again.stdout + again.stderr


def test_herl_grade_user_errors_are_one_line(tmp_path):
    """No judge key and an output folder that does not exist: one line each, no traceback."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "a", "messages": [{"role": "user", "content": "Hi."}],
                                   "rubric": [{"item_id": "j", "kind": "judge", "description": "Is kind."}],
                                   "response": "Hello."}) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    nokey = subprocess.run([sys.executable, "-m", "herl.commands.cli", "grade", "--input", str(prompts), "--output",
                            str(tmp_path / "o.parquet"), "--set", "grade.judge.model=gpt-4o-mini"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    _assert_user_error(nokey, "no judge API key", "OPENAI_API_KEY")
    nodir = _herl("grade", "--input", str(prompts), "--output", str(tmp_path / "missing" / "o.parquet"))
    _assert_user_error(nodir, "cannot write", "does not exist")


@pytest.mark.parametrize("cmd,name", [("plot", "plot.png"), ("view", "report.html")])
def test_a_view_that_cannot_be_written_asks_for_another_place_not_a_resume(finished, tmp_path, cmd, name, capsys):
    from herl.commands.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / name).mkdir(exist_ok=True)  # where the file goes, something it cannot replace
    assert main([cmd, str(run)]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and f"herl {cmd} RUN_DIR --out FILE" in err and "herl resume" not in err
    assert main([cmd, str(run), "--out", str(tmp_path / f"elsewhere-{name}")]) == 0


@pytest.mark.slow
def test_a_sigkill_of_supervisor_and_worker_together_leaves_no_process(tmp_path):
    """`pkill -9 -f "herl run"` kills the supervisor and its worker at once: nobody is left
    to reap Prefect's server, the training job's fork server or the resource tracker. The
    watchdog (herl/util/watchdog.py) ends every process that carries the run's token."""
    import psutil

    from herl.util.watchdog import TOKEN_ENV

    runs = tmp_path / "runs"
    run_dir = runs / "both"
    log = tmp_path / "run.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "herl.commands.cli", "run", "--run-id", "both", "--runs-dir",
                                 str(runs), "--iterations", "3", *_set_args(small_overrides(runs, run_id="both"))],
                                cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline:  # the train stage runs: server, fork server and job all exist
            m = run_dir / "iter-0" / "_manifests" / "train.json"
            if m.exists() and json.loads(m.read_text()).get("status") == "running":
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached the train stage")
        (worker,) = [c for c in psutil.Process(proc.pid).children() if "herl.util.watchdog" not in c.cmdline()]
        token = worker.environ()[TOKEN_ENV]
        helpers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if p.pid != worker.pid and "herl.util.watchdog" not in p.cmdline()]
        assert any("prefect.server" in " ".join(p.cmdline()) for p in helpers), [p.cmdline() for p in helpers]
        for pid in (proc.pid, worker.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def carriers():
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get(TOKEN_ENV) == token:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    deadline = time.time() + 30
    while carriers() and time.time() < deadline:
        time.sleep(0.5)
    assert not carriers(), [p.cmdline() for p in carriers()]
    _, alive = psutil.wait_procs(helpers, timeout=1)
    # a zombie is dead, waiting for init to reap it (how soon is init's business)
    running = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not running, [p.cmdline() for p in running]


def test_a_ctrl_c_while_the_query_starts_stops_it_and_leaves_no_query_running(finished, monkeypatch):
    """Ctrl-C landing just as the query's process has started (inside Popen, before
    run_query holds it): the query is stopped and its process killed, not left running."""
    import psutil

    from herl.runs.query import QueryStopped, run_query

    real, started = subprocess.Popen, []

    def popen_then_ctrl_c(*a, **kw):
        proc = real(*a, **kw)
        started.append(proc.pid)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C before Popen has returned
        for _ in range(100):  # a SIGINT run_query does not hold would land here
            time.sleep(0.001)
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen_then_ctrl_c)
    cross = "SELECT count(*) FROM rollouts a, rollouts b, rollouts c, rollouts d, rollouts e, rollouts f, rollouts g"
    with pytest.raises(QueryStopped, match="stopped by Ctrl-C"):
        run_query(finished, cross)
    assert started
    assert not psutil.pid_exists(started[0]) or psutil.Process(started[0]).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("kind", ["device", "fifo", "folder", "proc"])
def test_outputs_never_replace_what_is_not_a_regular_file(finished, tmp_path, kind, capsys):
    """`herl grade --output` and `herl report --out` at a device node (made with mknod, as
    /dev/full is), a FIFO, an existing folder, or a place no file can be made: one line,
    exit 2, and the thing there is still what it was."""
    import stat

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "a", "messages": [{"role": "user", "content": "Hi."}],
                                   "rubric": [{"item_id": "i", "kind": "include", "params": {"text": "hello"}}],
                                   "response": "Hello."}) + "\n")
    target = tmp_path / "target"
    if kind == "device":
        if os.geteuid() != 0:
            pytest.skip("mknod of a device needs root")
        os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # what /dev/full is
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    else:
        target = Path("/proc/herl-output.parquet")
    from herl.commands.cli import main

    before = os.lstat(target).st_mode if target.exists() or kind != "proc" else None
    for args in (("grade", "--input", str(prompts), "--output", str(target)),
                 ("report", str(finished), "--out", str(target))):
        assert main(list(args)) == 2, args  # in this process: the command's own code path
        assert f"cannot write {target}" in capsys.readouterr().err
        if before is not None:
            assert os.lstat(target).st_mode == before, args  # still a device / FIFO / folder
        else:
            assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".target")]  # no temporary left


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP],
                         ids=["hup", "term", "kill", "stopped-parent"])
def test_no_query_outlives_herl_sql(finished, sig):
    """HUP, TERM or KILL sent to `herl sql`'s own pid (as a supervisor or script sends it)
    ends its query process too, within 2 s; a `herl sql` that is stopped (SIGSTOP) cannot
    hold its query past --timeout: the query process keeps the limit itself."""
    import psutil

    cross = "SELECT count(*) FROM rollouts a, rollouts b, rollouts c, rollouts d, rollouts e, rollouts f, rollouts g"
    timeout = ["--timeout", "4"] if sig == signal.SIGSTOP else ["--timeout", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "herl.commands.cli", "sql", str(finished), cross, *timeout],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (children := psutil.Process(proc.pid).children()):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    query = children[0]
    time.sleep(1.0)  # the query is running
    os.kill(proc.pid, sig)

    def ended() -> bool:  # gone, or a zombie its stopped parent cannot reap yet
        try:
            return query.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    try:
        limit = time.time() + (2 if sig != signal.SIGSTOP else 4 + 1 + 3)
        while not ended():
            if time.time() > limit:
                pytest.fail(f"the query process {query.pid} still runs after {signal.Signals(sig).name} to herl sql")
            time.sleep(0.1)
    finally:
        if sig == signal.SIGSTOP:
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill() if proc.poll() is None else None
        proc.wait(timeout=30)


def test_a_flipped_bit_in_a_table_is_never_read_as_data(finished, tmp_path, capsys):
    """One bit flipped inside rewards.parquet or rollouts.parquet (not only the footer), at
    many offsets: every read path refuses it with how to repair it (herl sql, the query API
    by any name, upper case too); none returns other numbers. The manifests recorded each
    file's digest when it was written."""
    import random

    from herl.commands.cli import main
    from herl.runs.query import DamagedTableError, query_run

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    truth = query_run(run, "SELECT sum(reward), count(*) FROM rewards").fetchall()
    rng = random.Random(0)
    for table in ("rewards", "rollouts"):
        f = run / "iter-1" / f"{table}.parquet"
        original = f.read_bytes()
        offsets = sorted(rng.sample(range(4, len(original) - 8), 30))
        for i, offset in enumerate(offsets):
            flipped = bytearray(original)
            flipped[offset] ^= 1 << (i % 8)
            f.write_bytes(bytes(flipped))
            for sql in (f"SELECT * FROM {table}", f"SELECT * FROM query_table('{table.upper()}')",
                        f"SELECT count(*) FROM {table.upper()} WHERE iteration = 1"):
                with pytest.raises(DamagedTableError, match=f"table {table}: .*herl resume"):
                    query_run(run, sql).fetchall()
        f.write_bytes(original)
        # herl sql, in a process of its own, refuses too (one offset: it starts a process per query)
        flipped = bytearray(original)
        flipped[offsets[len(offsets) // 2]] ^= 0x10
        f.write_bytes(bytes(flipped))
        assert main(["sql", str(run), f"SELECT count(*) FROM {table}"]) == 2
        assert f"table {table}:" in capsys.readouterr().err
        f.write_bytes(original)
    # restored bytes (new times, the same digest) read again, with the true numbers
    again = query_run(run, "SELECT sum(reward), count(*) FROM rewards").fetchall()
    assert again[0][1] == truth[0][1] and again[0][0] == pytest.approx(truth[0][0])


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_ctrl_c_while_herl_starts_prints_no_traceback(finished, delay):
    """Ctrl-C during herl's imports (the first second or two): exit 130, one line, no
    KeyboardInterrupt traceback (there was one at 1.2 s)."""
    proc = subprocess.Popen([sys.executable, "-m", "herl.commands.cli", "status", str(finished)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err[-2000:]
    # 0: it had already finished; -SIGINT: the signal came before Python ran herl's code (its
    # default action ends the process, quietly); 130: herl's own quiet exit
    assert proc.returncode in (0, 130, -signal.SIGINT)
    if proc.returncode == 130:
        assert "interrupted" in err


@pytest.mark.parametrize("key,url,command", [
    ("grade.judge.base_url", "S3CRETUSER:S3CRETPW@judge.example/v1", True),  # no scheme
    ("grade.judge.base_url", "http:\\\\S3CRETUSER:S3CRETPW@judge.example/v1", False),  # backslashes
    ("grade.judge.base_url", "https://judge.example/v1?api_key=S3CRETPW", False),
    ("grade.judge.base_url", "https://judge.example/v1?x=1&access_token=S3CRETPW", False),
    ("tracking.mlflow_uri", "http://S3CRETUSER:S3CRETPW@mlflow.example:5000", False),
], ids=["no-scheme", "backslashes", "api_key-query", "token-query", "mlflow"])
def test_no_credential_in_a_url_is_stored(tmp_path, key, url, command, capsys, monkeypatch):
    """Every URL a config holds (the judge's, MLflow's), every way of hiding a secret in it:
    refused in one line, before anything is written, and the secret is nowhere on disk
    afterwards: not in the runs folder, herl's home or Prefect's home (its database). The
    first variant through the real command (supervisor, worker, Prefect's home), the others
    in this process as the worker runs them."""
    from herl.commands.cli import main
    from herl.commands.supervise import SUPERVISED_ENV

    runs = tmp_path / "runs"
    homes = {"HERL_HOME": tmp_path / "herl-home", "PREFECT_HOME": tmp_path / "prefect-home"}
    args = ["run", "--runs-dir", str(runs), "--run-id", "c", "--set", f"{key}={url}"]
    if command:
        proc = subprocess.run([sys.executable, "-m", "herl.commands.cli", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, **{k: str(v) for k, v in homes.items()}})
        _assert_user_error(proc, key, "hidden")
        out = proc.stdout + proc.stderr
    else:
        monkeypatch.setenv(SUPERVISED_ENV, "1")
        for k, v in homes.items():
            monkeypatch.setenv(k, str(v))
        assert main(args) == 2
        out = capsys.readouterr().err
        assert key in out and "hidden" in out
    assert "S3CRETPW" not in out
    for folder in (runs, *homes.values()):
        for f in (folder.rglob("*") if folder.exists() else []):
            if f.is_file():
                assert b"S3CRETPW" not in f.read_bytes(), f


def test_sql_output_streams_within_its_limits(finished):
    """30M rows as JSON (or CSV) to a slow reader: the time limit covers the printing and
    the memory stays a batch's (it grew past 5 GB, and CSV ran 173 s past --timeout 20);
    --max-rows applies to every format."""
    import psutil

    big = "SELECT range AS x, repeat('y', 20) AS y FROM range(30000000)"
    for fmt in ("json", "csv"):
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "herl.commands.cli", "sql", str(finished), big, "--format", fmt,
                                 "--timeout", "8", "--memory-limit", "0.5"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = 0
        while proc.poll() is None:
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.NoSuchProcess:
                pass
            assert time.perf_counter() - t0 < 60, f"{fmt}: still printing after 60 s with --timeout 8"
            time.sleep(0.2)
        err = proc.stderr.read()
        assert proc.returncode in (0, 2), err[-2000:]
        if proc.returncode == 2:
            assert "stopped after 8 s, its time limit" in err
        assert peak < 1.5e9, f"{fmt}: {peak / 1e9:.1f} GB"
    import csv
    import io

    for fmt in ("csv", "json"):
        out = _herl("sql", str(finished), "SELECT * FROM rollouts", "--format", fmt, "--max-rows", "10")
        rows = list(csv.reader(io.StringIO(out.stdout)))[1:] if fmt == "csv" else out.stdout.splitlines()
        assert out.returncode == 0 and len(rows) == 10, (fmt, out.stdout[-500:])
    shown = _herl("sql", str(finished), "SELECT * FROM rollouts", "--max-rows", "3")
    assert shown.returncode == 0 and "(the first 3 rows" in shown.stdout


_DRIVER = """
import sys
from herl.runs.rundir import load_run, open_run
from schemas.config import load_config
from stages import run_iteration
from stages.train import release_trainer
from tests.helpers import small_overrides
import json
overrides = json.loads(sys.argv[1])
run = open_run(load_config(None, overrides))
with run.lock():
    try:
        for k in range(run.cfg.iterations + 1):
            run_iteration(run, k)
    finally:
        release_trainer(run)
print("done", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full-6-random-kills", "lora-killed-in-train"])
def test_sigkill_then_resume_equals_a_run_never_killed(finished, tmp_path, lora):
    """A run killed with SIGKILL (its whole process group: stages, trainer, engine) and
    resumed ends with the tables and weights of a run never killed: the full fine-tune at
    6 random moments (10 checked by hand), against the shared run; LoRA once in each iteration's train stage,
    against its own uninterrupted twin. Nothing of a killed attempt is left running."""
    import random

    import psutil

    from tests.helpers import small_overrides

    def overrides(runs: Path) -> dict:
        return small_overrides(runs, run_id=RUN_ID, **({"train.lora.rank": 4} if lora else {}))

    def start(runs: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _DRIVER, json.dumps(overrides(runs))], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)

    def kill(proc: subprocess.Popen) -> None:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=15)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive

    reference = finished
    runs = tmp_path / "runs"
    kills = 0
    if lora:
        twin = start(tmp_path / "twin")
        assert twin.communicate(timeout=600)[0].strip() == "done"
        reference = tmp_path / "twin" / RUN_ID
        for k in (0, 1):  # killed while iteration k's update runs, then resumed
            proc = start(runs)
            manifest = runs / RUN_ID / f"iter-{k}" / "_manifests" / "train.json"
            deadline = time.time() + 300
            while not (manifest.exists() and '"running"' in manifest.read_text()):
                assert proc.poll() is None and time.time() < deadline
                time.sleep(0.01)
            time.sleep(0.5)
            kill(proc)
            kills += 1
    else:
        rng = random.Random(7)
        while kills < 6:
            proc = start(runs)
            time.sleep(rng.uniform(2.0, 12.0))  # the first seconds are imports; stages follow
            if proc.poll() is not None:  # it finished first: the kills so far must already add up
                break
            kill(proc)
            kills += 1
        assert kills >= 4  # most kills landed while the run was going
    proc = start(runs)
    assert proc.communicate(timeout=600)[0].strip() == "done"
    _assert_same_tables(runs / RUN_ID, reference)
