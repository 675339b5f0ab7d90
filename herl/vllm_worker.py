"""Generation with vLLM's offline engine, run as its own process in vLLM's environment.

    python vllm_worker.py REQUESTS.jsonl RESULTS.jsonl

Imports only the standard library and vllm, because it runs under the interpreter of a
separate virtual environment (vLLM pins a fastapi that Prefect's server cannot use).
herl.engines.VLLMEngine writes the requests and reads the results; the process exits
when done, which releases the engine's memory before the train stage.

REQUESTS.jsonl: first line {"engine": {...LLM kwargs...}, "sampling": {...}}, then one
line per request {request_id, prompt_token_ids, seed, n}. RESULTS.jsonl: one line per
request {request_id, completions: [{token_ids, text, finish_reason, logprobs}]}, written
to a temporary file and renamed, plus a last line {"stats": {...}}.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(req_path: str, out_path: str) -> int:
    with open(req_path) as fh:
        header = json.loads(fh.readline())
        requests = [json.loads(line) for line in fh if line.strip()]
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = dict(header["engine"])
    chunked = engine.pop("enable_chunked_prefill", None)
    from vllm.platforms import current_platform

    if chunked is None and current_platform.is_cpu():
        # Chunked prefill rewinds a seeded request's random generator when it splits the
        # prompt across steps, which CPU generators cannot do ("CPU Generator does not use
        # offset"): schedule whole prompts on CPUs.
        chunked = False
    if chunked is not None:
        engine["enable_chunked_prefill"] = chunked
        if not chunked:
            engine.setdefault("max_num_batched_tokens", max(8192, engine.get("max_model_len") or 0))
    llm = LLM(**engine)
    startup = time.perf_counter() - t0
    s = header["sampling"]
    greedy = s["temperature"] == 0
    prompts, params, owners = [], [], []
    for req in requests:
        # vLLM accepts n > 1 only when sampling; greedy samples are one request each
        copies = [(req["seed"], req["n"])] if not greedy else [(req["seed"], 1)] * req["n"]
        for seed, n in copies:
            prompts.append(TokensPrompt(prompt_token_ids=req["prompt_token_ids"]))
            params.append(SamplingParams(
                n=n, temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"] or -1,
                max_tokens=s["max_tokens"], seed=seed % (2**63), logprobs=0, skip_special_tokens=True,
                stop_token_ids=s.get("stop_token_ids") or None))
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
