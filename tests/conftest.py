from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on the cores: one thread each (and in what they start), as two
    # OpenMP thread pools on the same cores spin against each other
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _no_trainer_left():
    """A test that runs train stages without a flow (run_iteration) leaves the resident
    trainer up, as a run would until its end: stop it after each test, so the next test
    starts from a process without one."""
    yield
    import sys

    client = sys.modules.get("herl.trainer_service.client")
    if client is not None:
        client.release_trainers()


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


@pytest.fixture(scope="session")
def done_run(tmp_path_factory):
    """A finished two-iteration run of the small test config (tests.helpers.small_overrides,
    run id "t"), shared read-only: a test that changes it works on a copy."""
    from herl.runs.rundir import open_run
    from schemas.config import load_config
    from stages import run_iteration
    from tests.helpers import small_overrides

    run = open_run(load_config(None, small_overrides(tmp_path_factory.mktemp("done"))))
    for k in range(2):
        run_iteration(run, k)
    return run


# the system tests in three groups, each run one at a time on one worker: processes that
# are stopped and timed, generation-heavy engines, whole runs
SYSTEM_GROUPS = {"test_hostile": "stops", "test_resume": "stops", "test_progress": "stops",
                 "test_vllm": "engines", "test_real_model": "engines"}


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2`, pyproject's addopts) a system test file's group runs one
    test at a time on one worker while unit tests share the other core."""
    for item in items:
        if "system" in item.path.parts:
            item.add_marker(pytest.mark.xdist_group(SYSTEM_GROUPS.get(item.path.stem, "runs")))
