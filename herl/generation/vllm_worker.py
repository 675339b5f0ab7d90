"""Generation with vLLM's offline engine, run as its own process in vLLM's environment.

    python vllm_worker.py ENGINE.json CONTROL_FD

Imports only the standard library and vllm, because it runs under the interpreter of a
separate virtual environment (vLLM pins a fastapi that Prefect's server cannot use).
herl.generation.engines.VLLMEngine starts it once per run and sends it jobs: every generating stage
of every iteration shares one engine start-up, each new snapshot's weights loaded in
place. It exits at the end of its input (herl.generation.engines.release_engines), which releases
the engine's memory.

ENGINE.json: the LLM kwargs, plus herl's "herl_sleep" (vllm.between_iterations: whether
sleep mode is enabled). Then one job per line on stdin:
  {"requests": PATH, "results": PATH}  generate. REQUESTS: first line {"sampling": {...}},
      then one line per request {request_id, prompt_token_ids, seed, n}. RESULTS: one line
      per request {request_id, completions: [{token_ids, text, finish_reason, logprobs}]},
      written to a temporary file and renamed, plus a last line {"stats": {...}}.
  {"reload": FOLDER}  load the weights of FOLDER (same architecture) in place (waking the
      engine first if it sleeps) and drop the prefix cache, which the old weights computed.
  {"sleep": MODE}     before a train job: sleep (level 2: weights and KV cache freed; the
      next reload brings weights back) when sleep mode is on, else nothing.
After each job one JSON line goes to CONTROL_FD: {"ok": true, ...} or {"error": "..."}
(stdout is the engine's log).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def start(engine: dict):
    """The LLM, and its start-up seconds."""
    t0 = time.perf_counter()
    from vllm import LLM
    from vllm.platforms import current_platform

    engine = dict(engine)
    sleep = engine.pop("herl_sleep", "auto")
    if sleep == "sleep" or (sleep == "auto" and not current_platform.is_cpu()):
        engine["enable_sleep_mode"] = True  # vLLM's sleep mode needs a GPU
    chunked = engine.pop("enable_chunked_prefill", None)
    if chunked is None and current_platform.is_cpu():
        # Chunked prefill rewinds a seeded request's random generator when it splits the
        # prompt across steps, which CPU generators cannot do ("CPU Generator does not use
        # offset"): schedule whole prompts on CPUs.
        chunked = False
    if chunked is not None:
        engine["enable_chunked_prefill"] = chunked
        if not chunked:
            engine.setdefault("max_num_batched_tokens", max(8192, engine.get("max_model_len") or 0))
    # herl/generation/vllm_ext/herl_vllm_reload.py: the engine's PYTHONPATH holds that folder (and nothing else of herl's)
    engine["worker_extension_cls"] = "herl_vllm_reload.WeightReload"
    llm = LLM(**engine)
    return llm, time.perf_counter() - t0


def generate(llm, req_path: str, out_path: str, startup: float) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with open(req_path) as fh:
        s = json.loads(fh.readline())["sampling"]
        requests = [json.loads(line) for line in fh if line.strip()]

    greedy = s["temperature"] == 0
    prompts, params, owners = [], [], []
    for req in requests:
        # vLLM accepts n > 1 only when sampling; greedy samples are one request each
        copies = [(req["seed"], req["n"])] if not greedy else [(req["seed"], 1)] * req["n"]
        for seed, n in copies:
            prompts.append(TokensPrompt(prompt_token_ids=req["prompt_token_ids"]))
            params.append(SamplingParams(
                n=n, temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"] or -1,
                max_tokens=s["max_tokens"], seed=seed % (2**63), logprobs=0, skip_special_tokens=True))
            owners.append(req["request_id"])
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    gen_seconds = time.perf_counter() - t1

    results: dict[str, list[dict]] = {req["request_id"]: [] for req in requests}
    generated = 0
    for owner, out in zip(owners, outputs):
        for c in out.outputs:
            ids = list(c.token_ids)
            generated += len(ids)
            # logprobs=0 returns the sampled token's log-probability at each step
            lps = [next(iter(step.values())).logprob if step else None for step in (c.logprobs or [])]
            results[owner].append({"token_ids": ids, "text": c.text,
                                   "finish_reason": "stop" if c.finish_reason == "stop" else "length",
                                   "logprobs": lps or None})
    tmp = out_path + ".tmp"
    with open(tmp, "w") as fh:
        for req in requests:
            fh.write(json.dumps({"request_id": req["request_id"], "completions": results[req["request_id"]]}) + "\n")
        fh.write(json.dumps({"stats": {"startup_seconds": startup, "generation_seconds": gen_seconds,
                                       "generated_tokens": generated}}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out_path)


class Weights:
    """The engine's weights: which folder they came from, and whether they sleep."""

    def __init__(self, llm, folder: str, sleep_mode: bool):
        self.llm, self.folder, self.sleep_mode, self.asleep = llm, folder, sleep_mode, False

    def reload(self, folder: str) -> dict:
        t0 = time.perf_counter()
        if self.asleep:  # vLLM's RLHF order: weights back first, then the KV cache
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("herl_reload", args=(folder,))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        # cached prefixes hold keys and values the old weights computed
        self.llm.reset_prefix_cache()
        self.folder = folder
        return {"ok": True, "seconds": time.perf_counter() - t0}

    def sleep(self, mode: str) -> dict:
        if mode in ("sleep", "auto") and self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)  # level 2: the weights are not kept (the next reload brings them)
            self.asleep = True
        return {"ok": True, "asleep": self.asleep}


def watch_parent(interval_s: float = 1.0) -> None:
    """End this engine, and every process it started, when the process that started it is
    gone (killed with SIGKILL, say): re-parented, getppid() changes. A thread of this
    process, so it needs nothing of the parent's (PR_SET_PDEATHSIG would fire when the
    parent's starting thread ends, which a stage's thread does)."""
    import signal
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os.killpg(os.getpgrp(), signal.SIGKILL)  # the engine's own group (its own session)

    threading.Thread(target=watch, daemon=True, name="herl-parent-watch").start()


def serve(engine_path: str, control_fd: int) -> int:
    watch_parent()
    control = os.fdopen(control_fd, "w", buffering=1)
    with open(engine_path) as fh:
        kwargs = json.load(fh)
    llm, startup = start(kwargs)
    weights = Weights(llm, kwargs["model"], bool(llm.llm_engine.vllm_config.model_config.enable_sleep_mode))
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            if "reload" in job:
                answer = weights.reload(job["reload"])
            elif "sleep" in job:
                answer = weights.sleep(job["sleep"])
            else:
                if weights.asleep:  # asked to generate before new weights came: level 2 kept none
                    weights.reload(weights.folder)
                generate(llm, job["requests"], job["results"], startup)
                startup = 0.0  # reported once, with the first generation
                answer = {"ok": True}
            control.write(json.dumps(answer) + "\n")
        except Exception as exc:  # the engine stays up; the caller gets the error
            control.write(json.dumps({"error": traceback.format_exc()[-4000:]}) + "\n")
            if type(exc).__name__ == "EngineDeadError":  # its core process is gone (killed, out of memory)
                return 1  # exit: the caller starts a fresh engine instead of calling a dead one
    return 0


if __name__ == "__main__":
    raise SystemExit(serve(sys.argv[1], int(sys.argv[2])))
