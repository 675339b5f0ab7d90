"""Run a command that starts Prefect's temporary server so that nothing outlives it.

`herl run`, `herl resume` and `herl eval` start Prefect's temporary API server as a child
process, plus engine and training processes. If herl is killed (SIGTERM from a
scheduler, SIGKILL from the kernel's OOM killer) those children would be left running.
So the command runs in a worker process under a small supervisor:

    herl (supervisor, a child subreaper)  ->  herl worker  ->  Prefect server, engines, ...

- The supervisor is a Linux child subreaper: whatever the worker started is re-parented
  to it, not to init, when the worker dies. When the worker exits, for any reason
  (including SIGKILL), the supervisor terminates every process left under it.
- SIGINT (Ctrl-C), SIGTERM and SIGHUP (a closed terminal) to the supervisor are passed to
  the worker alone (one inherited as ignored, as under nohup, stays ignored)
  (it runs in its own session, so a terminal's Ctrl-C does not also hit Prefect's server
  or the training job), which stops cleanly: the stage's children are stopped, the stage
  is marked failed, the lock released, the temporary server stopped, and one line says how to
  resume. Leftovers are then terminated as above. A worker still running 20 s after the
  signal gets it again (a handler's exception can be dropped when it lands in a __del__),
  and one that has not stopped 60 s after the first is killed.
- The worker dies with the supervisor (PR_SET_PDEATHSIG), so a SIGKILL of the
  supervisor itself ends the worker, whose exit handlers stop the server (which also dies
  with the worker, PR_SET_PDEATHSIG).
- A SIGKILL of both at once leaves nobody to do either: a watchdog in its own session
  (herl/util/watchdog.py) waits for both and then terminates every process that carries
  the run's token in its environment (Prefect's server, the fork server, the resource
  tracker, an engine).

Elsewhere than Linux the command runs in-process, as before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from herl.util import watchdog
from herl.util.procs import become_subreaper, die_with_parent, terminate_descendants

SUPERVISED_ENV = "HERL_SUPERVISED"
STOP_GRACE_S = 60.0  # how long a worker asked to stop may take before it is killed
RESEND_S = 20.0  # a worker still running this long after a signal gets it again


def supervised() -> bool:
    """Whether this process is a supervised worker (or supervision is unavailable here)."""
    return os.environ.get(SUPERVISED_ENV) == "1" or not sys.platform.startswith("linux")


def _die_with_parent() -> None:  # runs in the worker between fork and exec
    die_with_parent(signal.SIGTERM)


def run_supervised(argv: list[str]) -> int:
    """Run `herl <argv>` as a supervised worker; returns its exit status (128 + signal when killed)."""
    import uuid

    become_subreaper()
    token = uuid.uuid4().hex
    env = {**os.environ, SUPERVISED_ENV: "1", watchdog.TOKEN_ENV: token}
    # its own session: a terminal's Ctrl-C (SIGINT to the foreground group) reaches only the
    # supervisor, which passes it to the worker alone. Prefect's temporary server and the
    # training job's fork server, children of the worker, must not get it: a server that
    # died first would leave the stopping worker retrying a dead connection.
    worker = subprocess.Popen([sys.executable, "-m", "herl.commands.cli", *argv], env=env, preexec_fn=_die_with_parent,
                              start_new_session=True)
    watchdog.start(token, [os.getpid(), worker.pid])
    deadline: list[float] = []
    asked: dict[str, float] = {}  # the signal passed on, and when

    def forward(signum, _frame):
        if not deadline:
            deadline.append(time.monotonic() + STOP_GRACE_S)
        asked.update(signum=signum, at=time.monotonic())
        try:
            worker.send_signal(signum)
        except ProcessLookupError:
            pass

    # a signal this process inherited as ignored stays ignored (`nohup herl run &`: closing
    # the terminal must not stop the run); the worker inherits the same disposition
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
                if signal.getsignal(s) != signal.SIG_IGN}
    try:
        while True:
            try:
                rc = worker.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if deadline and time.monotonic() > deadline[0]:  # asked to stop and still running
                    worker.kill()
                elif asked and time.monotonic() - asked["at"] > RESEND_S:
                    # Python runs a signal handler between bytecodes; if the exception it raises
                    # lands in a __del__ or a callback it is printed and dropped ("Exception
                    # ignored"), and the worker carries on. Asking again stops it.
                    asked["at"] = time.monotonic()
                    try:
                        worker.send_signal(int(asked["signum"]))
                    except ProcessLookupError:
                        pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        # the worker is gone: whatever it started (Prefect's server, an engine) goes too
        terminate_descendants()
    return 128 - rc if rc < 0 else rc
