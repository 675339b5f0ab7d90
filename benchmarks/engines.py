"""Generation throughput and start-up of the transformers and vLLM engines.

    python benchmarks/engines.py [--hidden 512 --layers 8] [--prompts 16 --n 8 --max-tokens 64]

Builds a random Qwen2 model of the given size locally (default ~27M parameters, the
byte-level tokenizer of builtin:tiny), samples `prompts` x `n` answers of exactly
up to `max-tokens` tokens with each engine (temperature 1), and prints a table: start-up seconds, generation seconds, generated tokens per second.
vLLM runs in its own environment (`herl install-vllm`); it is skipped if there is none.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from herl.generation.engines import (  # noqa: E402
    GenRequest,
    SamplingParams,
    find_vllm_python,
    load_engine,
    render_chat,
)
from herl.models.tiny import build_tiny_model  # noqa: E402
from schemas.config import VLLMConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model", hidden=args.hidden, layers=args.layers, heads=8,
                                 intermediate=3 * args.hidden, seed=0)
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
        params = (cfg.vocab_size * cfg.hidden_size
                  + cfg.num_hidden_layers * (4 * cfg.hidden_size ** 2 + 3 * cfg.hidden_size * cfg.intermediate_size))
        print(f"model: hidden {args.hidden}, {args.layers} layers, ~{params / 1e6:.1f}M parameters; "
              f"{args.prompts} prompts x {args.n} samples x up to {args.max_tokens} tokens\n")
        rows = []
        engines = [("transformers", None)]
        if find_vllm_python():
            engines.append(("vllm", VLLMConfig(enforce_eager=True, cpu_kvcache_gib=2)))
        else:
            print("(no vLLM environment: run `herl install-vllm --cpu` to include vLLM)\n")
        for kind, vcfg in engines:
            t0 = time.perf_counter()
            engine = load_engine(kind, model, batch_size=args.prompts * args.n, vllm_cfg=vcfg)
            reqs = [GenRequest(f"p{i}", render_chat(engine.tokenizer, [{"role": "user", "content": f"Tell story {i}."}])[1],
                            i, args.n) for i in range(args.prompts)]
            load_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            outs = engine.generate(reqs, SamplingParams(temperature=1.0, max_tokens=args.max_tokens))
            call_s = time.perf_counter() - t1
            tokens = sum(len(c.token_ids) for o in outs for c in o)
            if kind == "vllm":  # one process per call: split its start-up from generation
                startup = load_s + engine.last_stats["startup_seconds"]
                gen_s = engine.last_stats["generation_seconds"]
            else:
                startup, gen_s = load_s, call_s
            rows.append((kind, startup, gen_s, tokens, tokens / gen_s))
        print("| engine | start-up s | generation s | tokens | tokens/s |")
        print("|---|---|---|---|---|")
        for kind, startup, gen_s, tokens, tps in rows:
            print(f"| {kind} | {startup:.1f} | {gen_s:.2f} | {tokens} | {tps:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
