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
    # a line in a log file says how long the stage has run and, at the rate so far, how long it has left
    assert all(" s left" in line for line in lines[:-1]) and lines[-1].endswith(" s") and " left" not in lines[-1]


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


# ---- what a run says: its summary, a quiet console, the engine line, Prefect's database --


def test_a_run_ends_with_a_summary_of_what_happened(done_run):
    """The lines `herl run` ends with: iterations, mean reward first -> last (the grade
    stage's own numbers), seconds per stage kind, the engine, where to look."""
    from herl.runs.status import run_summary

    lines = run_summary(done_run.path, 12.5)
    text = "\n".join(lines)
    reward = {k: v for k in (0, 1) for s, n, v in done_run.metric_rows(k, ["grade"]) if n == "mean_reward"}
    assert lines[0] == "2 of 2 iterations done (this command: 12.5 s)"
    assert f"mean reward:  {reward[0]:.3f} (iteration 0) -> {reward[1]:.3f} (iteration 1)" in text
    stage_line = next(line for line in lines if line.startswith("stage time:"))
    assert all(f"{s} " in stage_line for s in ("rollout", "grade", "hindsight", "advantages", "train"))
    assert "engine:       transformers (rollout.engine = transformers)" in text
    assert f"herl view {done_run.path}" in text and str(done_run.path / "tracking" / "tensorboard") in text


def test_the_console_drops_completed_lines_and_crash_noise_but_keeps_the_rest():
    import logging

    from flows import _QuietConsole

    def record(name, msg, level=logging.INFO):
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    quiet = _QuietConsole()
    assert not quiet.filter(record("prefect.task_runs", "Finished in state Completed()"))
    assert not quiet.filter(record("prefect.flow_runs", "Crash detected! Execution was aborted by an interrupt signal.",
                                   logging.ERROR))
    assert quiet.filter(record("prefect.flow_runs", "Finished in state Completed()"))  # the run's own end stays
    assert quiet.filter(record("prefect.task_runs", "Finished in state Failed('boom')", logging.ERROR))
    assert quiet.filter(record("prefect.task_runs", "rollout iteration 0: done (1.0 s)"))


def test_the_run_engine_says_when_it_is_ready(capsys):
    from herl.generation.engines import release_engines, shared_engine
    from herl.models.paths import resolve_model_path

    release_engines()
    try:
        shared_engine("transformers", resolve_model_path("builtin:tiny"))
        shared_engine("transformers", resolve_model_path("builtin:tiny"))  # the same engine: said once
    finally:
        release_engines()
    err = capsys.readouterr().err
    assert err.count("herl: transformers engine ready for tiny-v1 in ") == 1, err


def test_the_temporary_server_gets_a_database_of_its_own(tmp_path, monkeypatch):
    """Not ~/.prefect's (a `prefect server start` shares nothing with herl), one per
    concurrent herl process; a configured server or database is left alone."""
    import os
    import subprocess
    import sys

    import flows

    monkeypatch.setenv("HERL_HOME", str(tmp_path))
    for var in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(var, raising=False)
    # another herl process holds the first slot
    holder = subprocess.Popen([sys.executable, "-c", "import flows, sys; print(flows.private_temporary_server(), "
                               "flush=True); sys.stdin.read()"], env={**os.environ}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == str(tmp_path / "prefect" / "server-0.db")
        monkeypatch.setattr(flows, "_held_slot", [])
        db = flows.private_temporary_server()
        assert db == tmp_path / "prefect" / "server-1.db"
        assert os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] == f"sqlite+aiosqlite:///{db}"
    finally:
        holder.communicate("")
        for lock in flows._held_slot:
            lock.close()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL")
    assert flows.private_temporary_server() is None and "PREFECT_API_DATABASE_CONNECTION_URL" not in os.environ


def test_the_temporary_server_answers_and_never_outlives_its_process(tmp_path, monkeypatch):
    """herl's early start of Prefect's temporary server: PREFECT_API_URL points at it and it
    answers /health; it is stopped when its process exits, and dies with it when that
    process is killed (SIGKILL: no exit handler runs). A server named by PREFECT_API_URL is
    used as it is: nothing is started."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    import flows
    from tests.helpers import ROOT

    monkeypatch.setenv("HERL_HOME", str(tmp_path))
    for var in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(var, raising=False)
    script = ("import os, sys, urllib.request, flows\n"
              "s = flows.start_temporary_server(); s.wait_ready()\n"
              "assert os.environ['PREFECT_API_URL'] == s.url\n"
              "print(s.proc.pid, urllib.request.urlopen(s.url + '/health').status, flush=True)\n"
              "sys.stdin.read()\n")

    def gone(pid: int, within_s: float) -> bool:
        deadline = time.time() + within_s
        while time.time() < deadline:
            if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
            time.sleep(0.1)
        return False

    for ending in ("exit", "sigkill"):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env={**os.environ}, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline().split()
        assert len(line) == 2 and line[1] == "200", (line, proc.stderr.read() if proc.poll() is not None else "")
        server = int(line[0])
        assert psutil.Process(server).is_running()
        if ending == "exit":
            proc.stdin.close()
        else:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert gone(server, 15), f"the temporary server outlived its process ({ending})"
        if ending == "exit":
            assert proc.stderr is not None and flows.TemporaryServer.MARKER in proc.stderr.read()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert flows.start_temporary_server() is None


def test_herl_run_prints_one_summary_no_completed_echoes_and_the_engine_line(tmp_path):
    """What a user reads at the end of a small `herl run`: one line per stage (not two),
    the engine's ready line, one summary block naming the run folder."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    runs = tmp_path / "runs"
    sets = [x for k, v in small_overrides(runs, run_id="said").items() if k not in ("run_id", "runs_dir", "iterations")
            for x in ("--set", f"{k}={v}")]
    proc = subprocess.run([sys.executable, "-m", "herl.commands.cli", "run", "--runs-dir", str(runs), "--run-id", "said",
                           "--iterations", "1", *sets], cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("Finished in state Completed()") == 1, out  # the flow's own end; no task echoes it
    assert out.count("rollout iteration 0: done") == 1 and out.count("train iteration 0: done") == 1, out
    assert out.count("herl: transformers engine ready for tiny-v1 in ") == 1, out
    assert out.count("herl run: 1 of 1 iterations done (this command: ") == 1, out
    assert f"run folder:   {runs / 'said'}" in out
    # Prefect's temporary server, started by herl beside the pre-flight checks, serves no UI:
    # no "View at" link to a page that does not exist
    assert out.count("herl: starting Prefect's temporary server on http://127.0.0.1:") == 1 and "View at" not in out, out
    # benchmarks/orchestration.py reads these lines to time what Prefect adds: it must find
    # every stage, with the seconds its manifest holds
    import importlib.util

    spec = importlib.util.spec_from_file_location("orchestration", ROOT / "benchmarks" / "orchestration.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stamped = [f"{i:8.2f} {line}" for i, line in enumerate(out.splitlines())]
    found = [(float(m.group(1)), m.group(2), float(m.group(4))) for m in map(bench.STAGE_LINE.match, stamped) if m]
    from herl.runs.rundir import load_run

    run = load_run(runs / "said")
    planned = [(k, st) for k in range(2) for st in run.cfg.iteration_stages(k)]
    assert [st for _, st, _ in found] == [st for _, st in planned], found
    assert [s_ for _, _, s_ in found] == [round(run.read_manifest(k, st)["seconds"], 1) for k, st in planned]
    b = bench.breakdown(100.0, found)
    assert b["stages"] == sum(s_ for _, _, s_ in found) and b["rest"] == 100.0 - b["stages"]


def test_a_finished_command_exits_without_the_interpreters_teardown(tmp_path):
    """The worker of herl run / resume / eval ends as the interpreter's exit begins
    (threading's exit callbacks, where Prefect drains its workers, then the atexit
    handlers, stdout flushed, the exit status kept) and skips the teardown of every module
    and object (seconds after a run): a module global whose __del__ sleeps 5 s is never
    collected."""
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT

    script = ("import atexit, sys, threading, time\n"
              "from herl.util.procs import exit_without_teardown\n"
              "order = []\n"
              "threading._register_atexit(lambda: order.append('threading'))\n"
              "atexit.register(lambda: open(sys.argv[1], 'w').write(','.join(order + ['atexit'])))\n"
              "class Slow:\n"
              "    def __del__(self):\n"
              "        time.sleep(5)\n"
              "kept = Slow()\n"
              "print('said', end='')\n"
              "exit_without_teardown(7)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "order")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 7 and proc.stdout == "said", (proc.returncode, proc.stdout, proc.stderr)
    assert (tmp_path / "order").read_text() == "threading,atexit"
    assert time.perf_counter() - t0 < 4.5, "the interpreter's teardown ran (the 5 s __del__)"
