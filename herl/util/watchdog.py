"""A watchdog that outlives herl's supervisor and worker, so nothing they started outlives both.

The supervisor (herl/commands/supervise.py) reaps what the worker leaves when the worker
dies, and the worker dies with the supervisor. A SIGKILL of both at once (`pkill -9 -f
"herl run"`) leaves nobody to do either: Prefect's temporary server, the training job's
fork server and multiprocessing's resource tracker are re-parented to init. So the
supervisor starts this process, in its own session (a terminal's signals and a kill of
the process group miss it), with a token the worker and everything it starts inherit in
their environment (`HERL_PROCESS_TOKEN`). When every watched process is gone, it
terminates each process whose environment carries the token (then kills those still
running 5 s later) and exits. It carries no token itself.

    python -m herl.util.watchdog TOKEN PID [PID ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

TOKEN_ENV = "HERL_PROCESS_TOKEN"
POLL_S = 0.5


def start(token: str, pids: list[int]) -> subprocess.Popen:
    """Start the watchdog for `pids` (it waits for all of them to end)."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    return subprocess.Popen([sys.executable, "-m", "herl.util.watchdog", token, *map(str, pids)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def carriers(token: str) -> list:
    """The processes whose environment holds the token (this one excluded)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(TOKEN_ENV) == token:
                found.append(p)
        except psutil.Error:  # gone, or not ours to read
            continue
    return found


def terminate_carriers(token: str, grace_s: float = 5.0) -> int:
    """SIGTERM every carrier, SIGKILL those left after `grace_s`; returns how many there were."""
    from herl.util.procs import terminate_then_kill

    procs = carriers(token)
    terminate_then_kill(procs, grace_s)
    return len(procs)


def main(argv: list[str]) -> int:
    token, pids = argv[0], [int(a) for a in argv[1:]]
    while any(_alive(pid) for pid in pids):
        time.sleep(POLL_S)
    terminate_carriers(token)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
