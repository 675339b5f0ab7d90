"""Peak memory and tokens/s of the transformers engine generating a batch.

    python benchmarks/transformers_memory.py [--model builtin:smollm2-135m-instruct]
        [--sequences 64 --max-tokens 128 --root DIR]

Loads the engine (herl/generation/engines.py, TransformersEngine) with one batch of
`--sequences` prompts, samples up to `--max-tokens` tokens each at T = 1, and prints the
tokens generated, tokens/s and this process's peak resident memory. `--root` imports herl
from another checkout (an older commit), so before and after can be compared on the
same machine with the same samples.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.root))
    from herl.generation.engines import GenRequest, SamplingParams, TransformersEngine
    from herl.models.paths import resolve_model_path

    engine = TransformersEngine(resolve_model_path(args.model), batch_size=args.sequences)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB
    reqs = [GenRequest(str(i), engine.tokenizer(f"Write a long story about item {i}.")["input_ids"], i, 1)
            for i in range(args.sequences)]
    t0 = time.perf_counter()
    out = engine.generate(reqs, SamplingParams(1.0, 1.0, 0, args.max_tokens))
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for cs in out for c in cs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"| {args.root} | {tokens} | {tokens / seconds:.0f} | {peak:.2f} | {loaded:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
