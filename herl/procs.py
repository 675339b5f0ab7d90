"""Linux process ties (prctl): a child that dies with its parent, a parent that adopts its
orphaned grandchildren. Elsewhere than Linux these do nothing and return False."""

from __future__ import annotations

import ctypes
import signal

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
