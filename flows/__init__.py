"""Prefect flows: `iterate` (the training loop, deployment herl/iterate) and `evaluate`
(`herl eval`). Flows only wire stages; importing this package sets Prefect's defaults."""

from __future__ import annotations

import logging
import os


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


def hide_user_error_tracebacks() -> None:
    """Attach the filter to every handler Prefect's logging set up (console and API)."""
    import prefect  # noqa: F401  (its logging is configured on import)

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                      if n == "prefect" or n.startswith("prefect."))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not any(isinstance(f, _NoUserErrorTracebacks) for f in handler.filters):
                handler.addFilter(_NoUserErrorTracebacks())
