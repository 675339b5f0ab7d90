"""Prefect flows: `iterate` (the training loop, deployment herl/iterate) and `evaluate`
(`herl eval`). Flows only wire stages; importing this package sets Prefect's defaults."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any


def prefect_defaults() -> None:
    """Environment defaults for Prefect, set before it is imported (a user's own settings win)."""
    # The ephemeral API server needs 20-25 s to start on 2 cores; Prefect's default
    # start-up timeout (20 s) is too tight there. No telemetry leaves the machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The temporary server (a child process that inherits this environment) logs errors of
    # its own shutdown (events still in flight when it is stopped) as tracebacks after
    # every run; a failure that matters reaches the flow through its client anyway.
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")


_held_slot: list = []  # the open lock file of this process's database slot
_temporary: dict[str, str] = {}  # "ui": the address of the temporary server this process started


def private_temporary_server(slots: int = 16) -> Path | None:
    """Give Prefect's temporary server (started by `herl run`, `herl resume`, `herl eval`)
    a database of herl's own, so that it neither lists herl's runs in, nor locks, the
    database of a `prefect server start` (both default to ~/.prefect/prefect.db).

    A Prefect server already configured (PREFECT_API_URL) is used as it is, and a database
    the user chose (PREFECT_API_DATABASE_CONNECTION_URL) is kept: returns None. Otherwise
    the first free of `slots` SQLite files under $HERL_HOME/prefect/ is taken and held
    (flock) for this process's life: runs at once get one each, runs one after another
    reuse the first (an existing database starts about 5 s faster than a new one)."""
    import fcntl

    from herl.util.home import herl_home

    if os.environ.get("PREFECT_API_URL") or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"):
        return None
    folder = herl_home() / "prefect"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(slots):
        lock = open(folder / f"server-{i}.lock", "a")  # noqa: SIM115 (held until this process ends)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        _held_slot.append(lock)
        db = folder / f"server-{i}.db"
        os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{db}"
        return db
    return None  # every slot busy: Prefect's default database


class TemporaryServer:
    """Prefect's temporary API server, started by herl in `herl run`, `herl resume` and
    `herl eval` as soon as the config is read, so that its start-up (3-7 s on 2 cores,
    mostly its imports) runs beside the rest of the pre-flight checks instead of after them.

    Prefect would start the same server (`prefect.server.api.server:create_app` under
    uvicorn, the UI off) on its client's first use, after importing the server's modules
    into this process too (2-3 s more). Prefect is pointed at it with PREFECT_API_URL, set
    before Prefect is imported; `wait_ready` is called before the flow. It dies with this
    process (PR_SET_PDEATHSIG) and is stopped at exit after Prefect's own exit handlers
    (registered later, so run earlier) have sent their last events and logs."""

    MARKER = "herl: starting Prefect's temporary server"  # the line a user (and a test) sees

    def __init__(self, slot: Path | None = None) -> None:
        import atexit
        import sys
        import tempfile
        from importlib.util import find_spec

        spec = find_spec("prefect")
        if spec is None or spec.origin is None:
            raise RuntimeError("prefect is not installed: pip install -e . installs it")
        self._args = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent), "--factory",
                      "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--log-level", "error",
                      "--lifespan", "on"]
        self._env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                     "PREFECT__SERVER_FINAL": "1"}
        self._stderr = tempfile.TemporaryFile("w+")  # read back only if it fails to start
        self._slot = slot  # the database slot held for it (private_temporary_server), released by stop
        self._spawn()
        print(f"{self.MARKER} on {self.url} (set PREFECT_API_URL to use a server of your own)", file=sys.stderr,
              flush=True)
        atexit.register(self.stop)

    def _spawn(self) -> None:
        import socket
        import subprocess

        from herl.util.procs import die_with_parent

        with socket.socket() as sock:  # a free port; a lost race is retried in wait_ready
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{self.port}/api"
        _temporary["ui"] = f"http://127.0.0.1:{self.port}"
        # its own session: a terminal's Ctrl-C goes to herl, which stops the flow first
        self.proc = subprocess.Popen([*self._args, "--port", str(self.port)], env=self._env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True,
                                     preexec_fn=die_with_parent)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the server answers /health; a server that exits or never answers is
        an error that carries its last words."""
        import time
        import urllib.error
        import urllib.request

        timeout_s = timeout_s or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code == 3:  # uvicorn: the port was taken after it was chosen
                self._spawn()
                continue
            if code is not None:
                self._stderr.seek(0)
                raise RuntimeError(f"Prefect's temporary server exited with status {code} while starting: "
                                   f"{self._stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Prefect's temporary server did not answer on {self.url} within {timeout_s:.0f} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS raises the limit)")

    def stop(self) -> None:
        """Terminate the server (SIGKILL 5 s later); safe to call twice."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        # this process may start another (a command called in-process again): the address
        # and the database slot go with the server
        if os.environ.get("PREFECT_API_URL") == self.url:
            del os.environ["PREFECT_API_URL"]
        _temporary.pop("ui", None)
        if self._slot is not None:
            os.environ.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
            while _held_slot:
                _held_slot.pop().close()
            self._slot = None


def start_temporary_server() -> TemporaryServer | None:
    """Start Prefect's temporary server now, on a database of herl's own (see
    private_temporary_server); None when PREFECT_API_URL names a server already (used as
    it is). Call before Prefect is imported."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    prefect_defaults()
    return TemporaryServer(private_temporary_server())


def flow_overrides(run_id, iterations, model_path, runs_dir, overrides) -> dict[str, Any]:
    """Merge the flow's named parameters over `overrides`; unset (None) ones leave it alone."""
    named = {"run_id": run_id, "iterations": iterations, "model.path": model_path, "runs_dir": runs_dir}
    return {**(overrides or {}), **{k: v for k, v in named.items() if v is not None}}


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from free text: lowercase letters, digits and dashes only."""
    text = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


prefect_defaults()


class _NoUserErrorTracebacks(logging.Filter):
    """Drops the traceback from a log record whose exception is the user's to fix (a
    UserError, a full or read-only disk): the message says what and where; the traceback
    of a herl bug is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        from schemas.errors import UserError, disk_error

        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (isinstance(exc, UserError) or disk_error(exc) is not None):
            record.exc_info, record.exc_text = None, None
        return True


class _QuietConsole(logging.Filter):
    """On the terminal only (the Prefect UI keeps every record): drops the line each task
    logs when it completes (the stage's own line says it is done, with its time) and the
    crash lines a stop signal causes (herl says once, calmly, how to resume)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg == "Finished in state Completed()" and record.name.startswith("prefect.task_runs"):
            return False
        ui = _temporary.get("ui")
        if ui and msg.startswith(f"View at {ui}/"):  # a UI the temporary server does not serve
            return False
        if "aborted by an interrupt signal" in msg or "aborted by a termination signal" in msg:
            return False
        # a hang-up (SIGHUP) stops the run with SystemExit(129), which Prefect reports as an
        # exit call; only when a stop signal was noted (a sys.exit of a bug stays visible)
        if "aborted by Python system exit call" in msg:
            from herl.util.procs import stop_requested

            return stop_requested() is None
        return True


def hide_user_error_tracebacks() -> None:
    """Attach the filter to every handler Prefect's logging set up (console and API)."""
    import prefect  # noqa: F401  (its logging is configured on import)

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                      if n == "prefect" or n.startswith("prefect."))]
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not any(isinstance(f, _NoUserErrorTracebacks) for f in handler.filters):
                handler.addFilter(_NoUserErrorTracebacks())
            if isinstance(handler, PrefectConsoleHandler) and not any(isinstance(f, _QuietConsole) for f in handler.filters):
                handler.addFilter(_QuietConsole())


CRASH_AUTOMATION = "herl: a flow run whose heartbeats stop is crashed"
# three missed heartbeats at prefect.yaml's PREFECT_FLOWS_HEARTBEAT_FREQUENCY = 30 (set when
# the automation is first made on a server)
CRASH_AFTER_S = 90


def ensure_crash_automation() -> bool:
    """On a Prefect server of the user's own (PREFECT_API_URL; the temporary server dies
    with its run), make sure the automation exists that marks a herl flow run Crashed when
    its heartbeats stop for CRASH_AFTER_S (HERL_PREFECT_CRASH_AFTER_S; its worker was
    stopped, or its machine lost): Prefect emits the heartbeats, but only an automation turns their
    absence into a state. Created once per server, found by name after; True if it exists
    now. A server that refuses (no automations) is left as it is."""
    if not os.environ.get("PREFECT_API_URL") or _temporary:
        return False
    from datetime import timedelta

    after_s = int(os.environ.get("HERL_PREFECT_CRASH_AFTER_S", CRASH_AFTER_S))

    from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture
    from prefect.client.schemas.objects import StateType

    try:
        if Automation.read(name=CRASH_AUTOMATION) is not None:
            return True
    except (ValueError, LookupError):
        pass
    except Exception:  # noqa: BLE001  a server without automations: runs work, crashes stay unmarked
        return False
    try:
        Automation(
            name=CRASH_AUTOMATION,
            description="Created by herl's flows (flows/__init__.py): a herl flow run whose process stopped "
                        "sending heartbeats (killed, out of memory, its machine lost) is marked Crashed; "
                        "`herl resume` or a new deployment run with its run_id continues it.",
            trigger=EventTrigger(
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "flow", "prefect.resource.name": ["herl", "herl-eval"]},
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
                for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                within=timedelta(seconds=after_s)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, name="Crashed", force=False,
                                        message=f"no heartbeat for {after_s} s: the flow run's process is gone; "
                                                "`herl resume` continues its run folder")],
        ).create()
    except Exception:  # noqa: BLE001  one made meanwhile by another run, or none allowed
        return False
    return True
