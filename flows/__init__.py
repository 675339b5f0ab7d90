"""Prefect flows: `iterate` (the training loop, deployment herl/iterate) and `evaluate`
(`herl eval`). Flows only wire stages; importing this package sets Prefect's defaults."""

from __future__ import annotations

import os


def prefect_defaults() -> None:
    """Environment defaults for Prefect, set before it is imported (a user's own settings win)."""
    # The ephemeral API server needs 20-25 s to start on 2 cores; Prefect's default
    # start-up timeout (20 s) is too tight there. No telemetry leaves the machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from free text: lowercase letters, digits and dashes only."""
    text = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


prefect_defaults()
