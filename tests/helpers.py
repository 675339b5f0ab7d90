"""Helpers the tests share (paths, a small config, waiting for a server, a free port).
Fixtures live in conftest.py; tests import these from here."""

from __future__ import annotations

import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT.parent / "shared" / "benchmarks"


def small_overrides(runs_dir: Path, run_id: str = "t", **extra) -> dict:
    """A config small enough for a whole iteration in a few seconds on a CPU."""
    return {
        "run_id": run_id, "runs_dir": str(runs_dir), "iterations": 2,
        "task.num_prompts": 8, "task.prompts_per_iteration": 4,
        "rollout.engine": "transformers", "rollout.n": 4, "rollout.max_tokens": 8, "hindsight.max_tokens": 8, "hindsight.candidate_limit": 2,
        "train.micro_batch_size": 16, "train.mini_batches": 2, **extra,
    }


def wait_for_http(url: str, proc, log_path: Path, timeout: float, poll: float = 1.0) -> None:
    """Wait until `url` answers, failing with the server's log if it exits or times out."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None, f"server exited:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"{url} did not answer in {timeout} s:\n{log_path.read_text()[-3000:]}"
            time.sleep(poll)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def item_verdict(kind: str, response: str, **kwargs) -> tuple[str, str]:
    """(strict, loose) verdict of one rubric item of `kind` with these params; a check that
    could not run (verdict unknown) fails the calling test with its reason."""
    import json

    from herl.grading.rubric import VerifiableGrader

    item = {"item_id": kind, "description": "", "weight": 1.0, "kind": kind, "params": json.dumps(kwargs)}
    (v,) = VerifiableGrader().grade([item], response)
    assert v.strict != "unknown", v.detail
    return v.strict, v.loose_verdict


def perturbed_copy(src, dest, seed: int):
    """A snapshot of the same model with other weights (as a train step makes one)."""
    import torch
    from transformers import AutoModelForCausalLM

    from herl.models.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(dest)
    load_tokenizer(src).save_pretrained(dest)
    return dest


def greedy(engine) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and log-probs of three fixed prompts: what an engine's weights say."""
    from herl.generation.engines import GenRequest, SamplingParams, render_chat

    prompts = [render_chat(engine.tokenizer, [{"role": "user", "content": f"Say {i} things."}])[1] for i in range(3)]
    out = engine.generate([GenRequest(f"r{i}", ids, i, 1) for i, ids in enumerate(prompts)],
                          SamplingParams(temperature=0.0, max_tokens=12))
    return [(c[0].token_ids, c[0].logprobs) for c in out]


def same(a, b, tol: float = 1e-4) -> bool:
    """Equal greedy tokens, and log-probs within tol."""
    return all(x[0] == y[0] and max(abs(p - q) for p, q in zip(x[1], y[1])) < tol for x, y in zip(a, b))


# ---- what experiment trackers hold (tests/unit/test_tracking.py, tests/system/test_resume.py) ----

def sig5(value: float) -> float:
    """A metric's value as every tracker can hold it: TensorBoard keeps float32, so values
    go through float32 first (else 0.0067663499 and its float32 0.0067663502 round to
    different 5-digit numbers), then 5 significant digits."""
    import numpy as np

    return float(f"{float(np.float32(value)):.5g}")


def tensorboard_points(run):
    """Counter of (tag, step, value) of every scalar in the run's TensorBoard event files."""
    from collections import Counter

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.path / "tracking" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return Counter((tag, e.step, sig5(e.value)) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag))


def expected_points(run):
    """Counter of (metric, iteration, value) the trackers should hold: the metrics tables'."""
    from collections import Counter

    from herl.runs.tracking import iteration_metrics

    return Counter((key, k, sig5(value)) for k in range(run.cfg.iterations + 1)
                   for key, value in (iteration_metrics(run, k) or {}).items())
