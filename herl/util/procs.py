"""Linux process ties (prctl): a child that dies with its parent, a parent that adopts its
orphaned grandchildren. Elsewhere than Linux these do nothing and return False."""

from __future__ import annotations

import ctypes
import signal
from typing import NoReturn

_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """This process gets `sig` when its parent dies (safe between fork and exec)."""
    return _prctl(_PR_SET_PDEATHSIG, sig)


def become_subreaper() -> bool:
    """Orphans among this process's descendants are re-parented to it, not to init."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def terminate_then_kill(procs: list, grace_s: float) -> None:
    """SIGTERM each psutil process, SIGKILL those still running `grace_s` later (gone
    ones are skipped), and wait a little for the killed."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def terminate_descendants(grace_s: float = 10.0, passes: int = 1) -> None:
    """terminate_then_kill every process under this one. With `passes` > 1 a child
    subreaper catches, in a later pass, what a terminated child left re-parented to it."""
    import psutil

    for _ in range(passes):
        try:
            left = psutil.Process().children(recursive=True)
        except psutil.Error:
            left = []
        if left:
            terminate_then_kill(left, grace_s)


# ---- stop requests that must not be lost ---------------------------------------------
# A signal handler's exception can be dropped: when it lands while a __del__ runs, Python
# prints "Exception ignored" and carries on. The worker's handlers therefore also record
# the signal here, and long waits and the flow between stages ask.
_stop_signals: list[int] = []


def note_stop(signum: int) -> None:
    if not _stop_signals:
        _stop_signals.append(signum)


def stop_requested() -> int | None:
    """The first stop signal this process got, if any."""
    return _stop_signals[0] if _stop_signals else None


def raise_if_stop_requested() -> None:
    """Raise what the first stop signal should have raised (KeyboardInterrupt for SIGINT,
    SystemExit(128 + n) otherwise), if one arrived."""
    if _stop_signals:
        signum = _stop_signals[0]
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


def stop_on_signals() -> None:
    """In the worker: SIGINT raises KeyboardInterrupt, SIGTERM and SIGHUP SystemExit (so the stage
    is marked failed, locks are released and the exit handlers stop the temporary server;
    Python's default for SIGTERM dies at once), each also noted for raise_if_stop_requested."""
    def on_sigint(signum, _frame):
        note_stop(signum)
        raise KeyboardInterrupt

    def on_sigterm(signum, _frame):
        note_stop(signum)
        raise SystemExit(128 + signum)  # again for a repeated SIGTERM: the first may have been dropped

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # nohup: a closed terminal does not stop the run
        signal.signal(signal.SIGHUP, on_sigterm)  # a hang-up stops the run as SIGTERM does, resumably


def peak_rss_gb() -> float:
    """This process's peak resident memory in GB: /proc's VmHWM, which belongs to this
    program's own memory (getrusage's ru_maxrss survives exec, so a child started by a
    large parent reports the parent's peak). Elsewhere than Linux, ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def exit_without_teardown(code: int) -> NoReturn:
    """End a finished command's process now: run what the interpreter's exit runs (threading's
    exit callbacks and joins, then the atexit handlers: Prefect's last events and logs, the
    temporary server's stop, logging's flush, multiprocessing's clean-up) in its order,
    flush stdout and stderr, and leave without the interpreter's teardown of every module
    and object, which after a run (torch, transformers, Prefect loaded) takes 2-3 s on 2
    cores and does nothing a finished command needs. Only for a process's own entry point,
    never inside a library call (it ends the process)."""
    import atexit
    import os
    import sys
    import threading

    # what the interpreter's own exit does first, in its order: threading's exit callbacks
    # (Prefect drains its event and log workers there, while its server still answers) and
    # the join of non-daemon threads; then the atexit handlers
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)
