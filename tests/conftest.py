from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_homes(tmp_path_factory):
    """Keep the tiny model cache and Prefect's state out of the user's home."""
    home = tmp_path_factory.mktemp("homes")
    os.environ.setdefault("HERL_HOME", str(home / "herl"))
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    yield
