"""Verifiable grading throughput on the IFEval prompts, in one and two processes.

    python benchmarks/grading_throughput.py [--benchmarks DIR] [--copies N]

Responses are generated deterministically from each prompt (a mix of its own text,
lower-cased and upper-cased variants, JSON, bullets and highlights) so that every
instruction's check does real work. Prints a table of items/s and rows/s, strict and
loose verdicts included (loose runs each check on up to 8 variants of a response).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from herl.ifeval import detect_language  # noqa: E402
from herl.importers import load_prompts  # noqa: E402
from herl.rubric import VerifiableGrader  # noqa: E402


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


def grade_chunk(chunk: list[tuple[list[dict], str]]) -> int:
    grader = VerifiableGrader()
    n = 0
    for rubric, response in chunk:
        n += len(grader.grade(rubric, response))
    return n


def run(work: list[tuple[list[dict], str]], processes: int) -> float:
    # start cold: forked workers would otherwise inherit the language-detection cache
    # warmed by an earlier measurement
    detect_language.cache_clear()
    t0 = time.perf_counter()
    if processes == 1:
        grade_chunk(work)
    else:
        size = (len(work) + processes - 1) // processes
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(grade_chunk, [work[i:i + size] for i in range(0, len(work), size)]))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmarks", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks")
    ap.add_argument("--copies", type=int, default=4, help="grade the 541 prompts this many times, with different responses")
    args = ap.parse_args()
    prompts = load_prompts(args.benchmarks / "ifeval_input_data.jsonl")
    rng = random.Random(0)
    work = [(p["rubric"], make_response(p["messages"][0]["content"], rng)) for _ in range(args.copies) for p in prompts]
    items = sum(len(r) for r, _ in work)
    grade_chunk(work[:50])  # warm up imports and langdetect's profiles
    print(f"{len(work)} responses, {items} rubric items (strict and loose verdicts each)\n")
    print("| processes | seconds | items/s | responses/s |")
    print("|---|---|---|---|")
    for processes in (1, 2):
        secs = run(work, processes)
        print(f"| {processes} | {secs:.2f} | {items / secs:,.0f} | {len(work) / secs:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
