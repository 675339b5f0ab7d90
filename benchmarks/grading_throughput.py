"""Verifiable grading throughput on the IFEval and IFBench prompts, in one and two processes.

    python benchmarks/grading_throughput.py [--benchmarks DIR] [--copies N] [--only ifeval|ifbench]

IFEval responses are generated deterministically from each prompt (a mix of its own text,
lower-cased and upper-cased variants, JSON, bullets and highlights) so that every
instruction's check does real work. IFBench responses are IFBench's own sample responses
(real model answers, 294 of them), each copy a variant (as written, lower-cased,
upper-cased, its first half). Prints a table of items/s and responses/s, strict and loose
verdicts included (loose runs each check on up to 8 variants of a response); the
tokenizer caches are emptied before each measurement, so every copy is graded cold.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from herl.data.importers import load_prompts  # noqa: E402
from herl.grading.english import punkt_sentences, tokens  # noqa: E402
from herl.grading.ifbench import sentences  # noqa: E402
from herl.grading.ifeval import detect_language  # noqa: E402
from herl.grading.rubric import VerifiableGrader  # noqa: E402


def make_response(prompt: str, rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return prompt
    if kind == 1:
        return prompt.lower()
    if kind == 2:
        return prompt.upper()
    if kind == 3:
        quoted = prompt[:80].replace('"', "'")
        return f'```json\n{{"answer": "{quoted}"}}\n```'
    if kind == 4:
        return "<<Title>>\n\n" + "\n".join(f"* point {i}: {prompt[:40]}" for i in range(rng.randint(1, 6)))
    return "*Section one* " + prompt + "\n***\n*Section two* P.S. done. Any other questions?"


def ifbench_variant(response: str, copy: int) -> str:
    return [response, response.lower(), response.upper(), response[: len(response) // 2]][copy % 4]


def grade_chunk(chunk: list[tuple[list[dict], str, str]]) -> int:
    grader = VerifiableGrader()
    n = 0
    for rubric, response, prompt in chunk:
        n += len(grader.grade(rubric, response, prompt))
    return n


def run(work: list[tuple[list[dict], str, str]], processes: int) -> float:
    # start cold: forked workers would otherwise inherit the language-detection and
    # tokenizer caches warmed by an earlier measurement
    for cache in (detect_language, sentences, tokens, punkt_sentences):
        cache.cache_clear()
    t0 = time.perf_counter()
    if processes == 1:
        grade_chunk(work)
    else:
        size = (len(work) + processes - 1) // processes
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(grade_chunk, [work[i:i + size] for i in range(0, len(work), size)]))
    return time.perf_counter() - t0


def workload(benchmarks: Path, name: str, copies: int) -> list[tuple[list[dict], str, str]]:
    if name == "ifeval":
        prompts = load_prompts(benchmarks / "ifeval_input_data.jsonl")
        rng = random.Random(0)
        return [(p["rubric"], make_response(p["messages"][0]["content"], rng), p["messages"][0]["content"])
                for _ in range(copies) for p in prompts]
    prompts = {p["messages"][0]["content"]: p for p in load_prompts(benchmarks / "ifbench_test.jsonl")}
    answers = [json.loads(line) for line in open(benchmarks / "ifbench_sample_output.jsonl")]
    return [(prompts[a["prompt"]]["rubric"], ifbench_variant(a["response"], k), a["prompt"])
            for k in range(copies) for a in answers]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmarks", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks")
    ap.add_argument("--copies", type=int, default=4, help="grade every prompt this many times, with different responses")
    ap.add_argument("--only", choices=["ifeval", "ifbench"], default=None, help="measure one benchmark only")
    args = ap.parse_args()
    print("| benchmark | responses | items | processes | seconds | items/s | responses/s |")
    print("|---|---|---|---|---|---|---|")
    for name in [args.only] if args.only else ["ifeval", "ifbench"]:
        work = workload(args.benchmarks, name, args.copies)
        items = sum(len(r) for r, _, _ in work)
        grade_chunk(work[:50])  # warm up imports, langdetect's profiles, the Punkt model
        for processes in (1, 2):
            secs = run(work, processes)
            print(f"| {name} | {len(work)} | {items} | {processes} | {secs:.2f} | {items / secs:,.0f} "
                  f"| {len(work) / secs:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
