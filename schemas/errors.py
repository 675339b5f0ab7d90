"""The errors herl reports as the user's to fix, and the words for file-system failures.

A `UserError` is not a bug: the input, the files or the machine are not as herl needs
them. The `herl` command prints its message alone, without a traceback, and exits with
status 2 (`herl --debug ...` shows the traceback). Every message names what is wrong (file,
line, field or path) and what to do. Anything else that escapes is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input, files or machine; the message says what and where."""


class DiskError(UserError, OSError):
    """A write failed for want of space or permission; the run stays resumable."""

    def __str__(self) -> str:
        return str(self.strerror)


# errno -> what the user sees; others are not the user's to fix (a bug, or a device fault)
_DISK_WORDS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def disk_error(exc: BaseException, path: str | Path | None = None) -> DiskError | None:
    """A DiskError naming `path` (or the error's own file name) for an OSError of a full,
    read-only or forbidden disk; None for any other error."""
    if isinstance(exc, DiskError):
        return exc
    if not isinstance(exc, OSError) or exc.errno not in _DISK_WORDS:
        return None
    where = path or exc.filename or "a file"
    fix = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "make the folder writable"
    err = DiskError(exc.errno, f"{_DISK_WORDS[exc.errno]} while writing {where}: {fix}, then `herl resume` "
                               "the run (finished stages are kept)")
    err.filename = str(where)
    return err


def decode_error(path: Path, data: bytes, exc: UnicodeDecodeError) -> str:
    """'FILE: line L, byte offset O: not UTF-8 (byte 0x..)' for a file that is not UTF-8 text."""
    line = data.count(b"\n", 0, exc.start) + 1
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1)
    return (f"{path}: line {line}, byte offset {exc.start} (column {column}): not UTF-8 text "
            f"(byte 0x{data[exc.start]:02x}); save the file as UTF-8")


def read_utf8(path: Path, error: type[Exception]) -> str:
    """The text of `path`; a file that is not UTF-8 raises `error` naming file, line and byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(decode_error(Path(path), data, exc)) from None


class MissingError(UserError, FileNotFoundError):
    """A file or folder the user named (a model, a run, a prompts file) is not there."""


def existing_parent(path: str | Path) -> Path:
    """`path` itself when it exists, else its nearest existing parent folder."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def out_of_space(path: str | Path, margin: int = 1 << 20) -> bool:
    """Whether the file system holding `path` (or its nearest existing parent) has less
    than `margin` bytes free: what a write that failed for want of room leaves behind."""
    try:
        st = os.statvfs(existing_parent(path))
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin


def no_space(path: str | Path) -> DiskError:
    """The DiskError for a write to `path` that ran out of room."""
    err = disk_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path)
    assert err is not None
    return err
