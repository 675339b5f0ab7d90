"""Hindsight stage: revise the best answers of failed groups, guided by their verdicts.

docs/algorithm.md steps 3-5: pick candidates (herl/sql/candidates.sql), build each
one's hindsight prompt (herl/data/hindsight_prompt.py: instruction, items met / not met /
mistakes / unclear, the draft), regenerate with the same policy at a lower temperature, and grade
the revisions with the same grader. With `algorithm = "grpo"` it writes empty tables.

Reads:  iter-k/prompts, rollouts, verdicts, rewards; snapshot k
Writes: iter-k/hindsight.parquet           one row per revision, with its reward
        iter-k/hindsight_verdicts.parquet  one row per (revision, rubric item)
        iter-k/metrics-hindsight.parquet
Alone:  python -m stages.hindsight runs/<run_id> --iteration K
"""

from __future__ import annotations

from pathlib import Path

from herl.data.hindsight_prompt import build_hindsight_prompt, encode_prompt
from herl.generation.engines import (
    GenRequest,
    SamplingParams,
    derive_seed,
    sampling_temperature,
    shared_engine,
)
from herl.grading.rubric import grade_samples
from herl.runs.rundir import Run
from herl.sql import is_blank, run_sql_file
from schemas.tables import empty, read_table, write_table
from stages.common import stage_main, write_metrics

STAGE = "hindsight"


def run(run: Run, k: int) -> dict:
    cfg = run.cfg
    names = ("prompts", "rollouts", "verdicts", "rewards")
    inputs: dict[str, Path] = {n: run.table(k, n) for n in names}
    if cfg.hindsight_enabled:
        inputs["snapshot"] = run.snapshot(k)
    paths = {"hindsight": run.table(k, "hindsight"), "hindsight_verdicts": run.table(k, "hindsight_verdicts")}

    def body():
        rollouts = read_table("rollouts", inputs["rollouts"])
        rewards = read_table("rewards", inputs["rewards"])
        candidates = run_sql_file("candidates", {"rollouts": rollouts, "rewards": rewards},
                                  candidate_params(cfg)).to_pylist()
        groups_failed = len({c["prompt_id"] for c in candidates})
        rows: list[dict] = []
        verdict_rows: list[dict] = []
        gen_metrics: dict = {}
        if cfg.hindsight_enabled and candidates:
            rows, verdict_rows, gen_metrics = _revise(run, k, candidates, rollouts, inputs)
        out = {
            "hindsight": (paths["hindsight"], write_table("hindsight", rows or empty("hindsight"), paths["hindsight"])),
            "hindsight_verdicts": (paths["hindsight_verdicts"], write_table(
                "hindsight_verdicts", verdict_rows or empty("hindsight_verdicts"), paths["hindsight_verdicts"])),
        }
        # compared as revisions are chosen: choice rewards (a looping answer counts 0 under
        # hindsight.skip_looping), a win by more than the tie tolerance
        cand_reward = {c["rollout_id"]: c["choice_reward"] for c in candidates}
        group_best = {c["prompt_id"]: c["best_reward"] for c in candidates}
        tol = cfg.hindsight.tie_tolerance
        best_rev: dict[str, float] = {}
        best_rev_group: dict[str, float] = {}
        for r in rows:
            chosen = 0.0 if cfg.hindsight.skip_looping and r["looped"] else r["reward"]
            best_rev[r["candidate_rollout_id"]] = max(best_rev.get(r["candidate_rollout_id"], -1.0), chosen)
            best_rev_group[r["prompt_id"]] = max(best_rev_group.get(r["prompt_id"], -1.0), chosen)
        out["metrics"] = write_metrics(run, k, STAGE, {
            "groups_failed": groups_failed,
            "candidates": len(candidates) if cfg.hindsight_enabled else 0,
            "revisions": len(rows),
            # empty after stripping whitespace: never mixed in, no bonus (herl/sql/advantages.sql)
            "empty_revisions": sum(is_blank(r["response_text"]) for r in rows),
            "mean_candidate_reward": sum(cand_reward.values()) / len(cand_reward) if cand_reward else 0.0,
            "mean_revision_reward": sum(r["reward"] for r in rows) / len(rows) if rows else 0.0,
            "revisions_beat_candidate": sum(best_rev[c] > cand_reward[c] + tol for c in best_rev),
            # failed groups whose best revision scores above every original answer of the group
            "groups_beaten_by_revision": sum(best_rev_group[p] > group_best[p] + tol for p in best_rev_group),
            # the repetition rule (rewards.looped): candidates and revisions that loop
            "looping_candidates": sum(bool(c["looped"]) for c in candidates),
            "looping_revisions": sum(bool(r["looped"]) for r in rows),
            **gen_metrics,
        })
        return out

    return run.run_stage(k, STAGE, inputs, body)


def candidate_params(cfg) -> dict:
    """The bound parameters of candidates.sql for config `cfg`."""
    h = cfg.hindsight
    return {"threshold": h.threshold, "candidate_limit": h.candidate_limit, "skip_looping": h.skip_looping,
            "tie_tolerance": h.tie_tolerance}


def _revise(run: Run, k: int, candidates: list[dict], rollouts, inputs) -> tuple[list[dict], list[dict], dict]:
    cfg = run.cfg
    prompts = {p["prompt_id"]: p for p in read_table("prompts", inputs["prompts"]).to_pylist()}
    by_id = {r["rollout_id"]: r for r in rollouts.select(["rollout_id", "response_text"]).to_pylist()}
    verdicts: dict[str, list[str]] = {}
    details: dict[str, list[str]] = {}
    vt = read_table("verdicts", inputs["verdicts"]).sort_by([("sample_id", "ascending"), ("item_index", "ascending")])
    for sid, v, d in zip(vt.column("sample_id").to_pylist(), vt.column("verdict").to_pylist(),
                         vt.column("detail").to_pylist()):
        verdicts.setdefault(sid, []).append(v)
        details.setdefault(sid, []).append(d or "")

    snapshot = run.snapshot(k)
    snapshot_id = run.snapshot_id(k)
    engine = shared_engine(cfg.rollout.engine, snapshot, cfg.model.dtype, cfg.rollout.batch_size, cfg.vllm,
                           cfg.cluster, run.path)
    texts, requests = [], []
    for c in candidates:
        p = prompts[c["prompt_id"]]
        h = cfg.hindsight
        text = build_hindsight_prompt(p["messages"], p["rubric"], verdicts[c["rollout_id"]],
                                      by_id[c["rollout_id"]]["response_text"], h.show_weights,
                                      naive=cfg.algorithm == "naive_he", wording=h.template, show_draft=h.show_draft,
                                      show_items=h.show_items,
                                      details=details[c["rollout_id"]] if h.show_details else None)
        rendered, ids = encode_prompt(engine.tokenizer, text, cfg.hindsight.chat_template)
        texts.append(rendered)
        requests.append(GenRequest(c["rollout_id"], ids, derive_seed(cfg.seed, k, "hindsight", c["rollout_id"]),
                                   cfg.hindsight.revisions_per_candidate))
    params = SamplingParams(cfg.hindsight.temperature, cfg.hindsight.top_p, cfg.rollout.top_k,
                            cfg.hindsight.max_tokens or cfg.rollout.max_tokens)
    outs = engine.generate(requests, params)

    rows = []
    for c, text, req, comps in zip(candidates, texts, requests, outs):
        for j, comp in enumerate(comps):
            rows.append({
                "run_id": run.run_id, "iteration": k, "revision_id": f"{c['rollout_id']}:rev-{j}",
                "candidate_rollout_id": c["rollout_id"], "prompt_id": c["prompt_id"], "revision_index": j,
                "hindsight_prompt_text": text, "prompt_token_ids": req.prompt_token_ids,
                "response_text": comp.text, "response_token_ids": comp.token_ids,
                "finish_reason": comp.finish_reason, "num_tokens": len(comp.token_ids), "seed": req.seed,
                "snapshot_id": snapshot_id, "logprobs": comp.logprobs,
                "temperature": sampling_temperature(cfg.hindsight.temperature),
            })
    verdict_rows, scores, grader_stats = grade_samples(
        run.run_id, run.judge_cache, k, prompts, [(r["revision_id"], r["prompt_id"], r["response_text"]) for r in rows], cfg.grade)
    for r in rows:
        r.update(scores[r["revision_id"]])
    return rows, verdict_rows, {"mean_hindsight_prompt_tokens": sum(len(q.prompt_token_ids) for q in requests) / len(requests),
                                # 0 when the engine rollout started is still open
                                "engine_startup_seconds": getattr(engine, "last_stats", {}).get("startup_seconds", 0.0),
                                "engine_weight_sync_seconds": engine.sync_seconds,
                                **grader_stats}


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE, run))
