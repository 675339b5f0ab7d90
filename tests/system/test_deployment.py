"""Serving with Prefect as the README says: server, pool, deploy, worker, then
`prefect deployment run herl/iterate --watch` completes and leaves a full run,
`herl-eval/evaluate` evaluates the policy it trained, and a run whose worker is stopped
ends Crashed (the heartbeat automation the flows set up), not Running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from herl.runs.status import stage_status
from tests.helpers import ROOT, free_port, wait_for_http

pytestmark = pytest.mark.slow
PREFECT = [sys.executable, "-m", "prefect"]  # the CLI of the interpreter running the tests


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _artifacts(env: dict) -> list[list[str]]:
    """[key, type] of every artifact on the server, read with Prefect's client in one process."""
    code = ("import asyncio, json\nfrom prefect.client.orchestration import get_client\n"
            "async def main():\n    async with get_client() as c:\n"
            "        print(json.dumps([[a.key, a.type] for a in await c.read_artifacts() if a.key]))\n"
            "asyncio.run(main())\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _client_call(env: dict, body: str):
    code = ("import json\nfrom prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n" + body)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _state(env: dict, flow_run: str) -> list[str]:
    """[state type, message] of a flow run."""
    return _client_call(env, f"    s = c.read_flow_run({flow_run!r}).state\n    print(json.dumps([s.type.value, s.message or '']))\n")


def _automations(env: dict) -> list[str]:
    return _client_call(env, "    print(json.dumps([a.name for a in c.read_automations()]))\n")


def test_deployment_run_watch_completes(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "HERL_PREFECT_CRASH_AFTER_S": "35"}
    server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port),
                               "--analytics-off"], cwd=tmp_path, env=env, stdout=open(tmp_path / "server.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health", server, tmp_path / "server.log", timeout=120)

        def prefect(*args, cwd=ROOT, timeout=300):
            res = subprocess.run([*PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
            assert res.returncode == 0, f"prefect {' '.join(args)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            return res.stdout

        prefect("work-pool", "create", "herl", "--type", "process")
        prefect("--no-prompt", "deploy", "--all")
        # the worker runs from anywhere: the deployment's pull step points at the checkout
        worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "herl"], cwd=tmp_path, env=env,
                                  stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        runs = tmp_path / "runs"
        out = prefect("deployment", "run", "herl/iterate", "--watch", "--param", "iterations=1",
                      "--param", "run_id=served", "--param", f"runs_dir={runs}",
                      "--params", '{"overrides": {"task.prompts_per_iteration": 4, "rollout.n": 4, '
                                  '"rollout.max_tokens": 8, "hindsight.max_tokens": 8}}',
                      cwd=tmp_path, timeout=600)
        assert "Completed" in out
        assert [r["status"] for r in stage_status(runs / "served")] == ["done"] * 5
        # per iteration a markdown and a table artifact; the curves so far as one more; the
        # default tracker's event files
        artifacts = _artifacts(env)  # one client call (`prefect artifact ls` cuts long keys)
        for key, kind in (("herl-served-iter-0", "markdown"), ("herl-served-iter-0-table", "table"),
                          ("herl-served-plot", "markdown"), ("herl-served-progress", "progress")):
            assert [key, kind] in artifacts, artifacts
        assert (runs / "served" / "plot.png").stat().st_size > 10_000
        assert list((runs / "served" / "tracking" / "tensorboard").glob("events.out.tfevents.*"))

        # a run whose worker is stopped mid-run ends Crashed (the flow's heartbeat automation,
        # 35 s here), not Running forever; the evaluate deployment below runs meanwhile on a
        # fresh worker
        out = prefect("deployment", "run", "herl/iterate", "--param", "iterations=40", "--param", "run_id=orphan",
                      "--param", f"runs_dir={runs}", cwd=tmp_path)
        flow_run = next(x.split()[-1] for x in out.splitlines() if "UUID" in x)
        deadline = time.time() + 120
        while _state(env, flow_run)[0] != "RUNNING":
            assert time.time() < deadline, _state(env, flow_run)
            time.sleep(1)
        _stop(worker)
        worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "herl"], cwd=tmp_path, env=env,
                                  stdout=open(tmp_path / "worker2.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)

        # the evaluate deployment on the policy that run just trained, with per-round scores
        prompts = tmp_path / "prompts.jsonl"
        rubric = [{"item_id": "nd", "description": "Use no digits.", "kind": "no_digits"}]
        prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "messages": [{"role": "user", "content": "Hi."}],
                                               "rubric": rubric}) + "\n" for i in range(3)))
        evals = tmp_path / "evals"
        out = prefect("deployment", "run", "herl-eval/evaluate", "--watch", "--param", f"prompts={prompts}",
                      "--param", f"model={runs / 'served' / 'snapshots' / 'policy-1'}", "--param", f"out={evals}",
                      "--param", "rounds=1", "--params", '{"overrides": {"rollout.max_tokens": 8}}',
                      cwd=tmp_path, timeout=600)
        assert "Completed" in out
        metrics = pq.read_table(evals / "eval_metrics.parquet").to_pylist()
        assert {m["round"] for m in metrics} == {0, 1} and "mean_reward_strict" in {m["name"] for m in metrics}
        assert any(key.startswith("herl-eval-") for key, _ in _artifacts(env))

        deadline = time.time() + 150
        while (state := _state(env, flow_run))[0] == "RUNNING":
            assert time.time() < deadline, "the orphaned flow run stayed Running"
            time.sleep(2)
        assert state[0] == "CRASHED" and "no heartbeat for 35 s" in state[1], state
        automations = _automations(env)
        assert automations == ["herl: a flow run whose heartbeats stop is crashed"], automations  # once per server
    finally:
        # a worker whose server is gone ignores SIGTERM: stop the worker first
        if worker is not None:
            _stop(worker)
        _stop(server)
