"""The advantages stage against a line-by-line port of the reference's mixing code.

`reference_mix` below ports sikelifei/HeRL c527572 as it runs for instruction following
(the if_score reward and the constraint rewrite mode), from
`verl/trainer/ppo/ray_trainer.py`, `verl/trainer/ppo/fuse_helper.py`,
`verl/trainer/ppo/core_algos.py` and `verl/utils/reward_score/if_score/__init__.py`. Each
step cites the lines it ports. It works on plain Python lists instead of a DataProto, and
in float64 where the reference's reward tensors are float32.

Seeded random batches (G of 1/2/4/8, replace_top_n 1..G, one or two revisions per
candidate, empty revisions, looping answers, ties, non-integer weights) go through it and
through herl's SQL (stages.advantages.compute_batch); kept revisions, copies, replaced
members, shaped rewards, advantages and the temperature each row is trained at must be the
same. Where herl departs on purpose (docs/algorithm.md), the port is given herl's choice
or the case is left out, each with a comment:

- the replaced member: the reference draws it from an unseeded generator; the port takes
  herl's seeded order (md5(seed:rollout_id)), so the rest can be compared;
- sample order: the reference's ties fall back to the batch's order after its length
  balancing; the port's batch is in sample order, as herl breaks those ties;
- in-place fallback: a copy that reads a row an earlier slot of its group overwrote
  (replace_top_n >= 2) is a duplicate or a mislabelled revision in the reference; herl
  copies the original. Such groups are left out of the comparison and counted;
- near ties of a revision: a revision within the tie tolerance *below* the group's best
  ties it in herl; the reference compares exactly there. Such batches are left out and
  counted (they need a reward one rounding step away, 0.1 + 0.2 against 0.3).
"""

from __future__ import annotations

import hashlib
import random
import statistics
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pytest

import herl.sql
from herl.grading.rubric import is_looping
from herl.sql import WHITESPACE
from schemas.tables import TABLES
from stages import advantages

ALPHA, EPS, THRESHOLD, TOL = 0.05, 1e-6, 1.0, 1e-6
ROLLOUT_T, REVISION_T = 1.0, 0.3


# --- the port ----------------------------------------------------------------------------

def if_reward_info(score: float, follows: list[int], looped: bool) -> dict:
    """if_score/__init__.py compute_score, lines 94-97: a looping answer keeps `score` but
    gets `dense` 0 and no is_following_list."""
    if looped:
        return {"score": score, "dense": 0, "is_following_list": None}
    return {"score": score, "dense": score, "is_following_list": follows}


def get_numeric_score(score, fallback: float = 0.0) -> float:
    """fuse_helper.py lines 138-157."""
    if isinstance(score, dict):
        dense = score.get("dense")
        if isinstance(dense, (int, float)):
            return float(dense)
        flat = score.get("score")
        if isinstance(flat, (int, float)):
            return float(flat)
    return float(fallback)


def follow_count(info: dict) -> int:
    """sum(normalize_is_following_list(...) or []), fuse_helper.py lines 132-135."""
    raw = info.get("is_following_list")
    return sum(int(bool(x)) for x in raw) if isinstance(raw, list) else 0


def reference_candidates(rows: list[dict], candidate_limit: int) -> tuple[list[tuple[str, int]], dict]:
    """_collect_rewrite_jobs, ray_trainer.py lines 1173-1333: ([(uid, candidate row index)]
    in job order, {uid: the group's best numeric score})."""
    infos = [if_reward_info(r["score"], r["follows"], r["looped"]) for r in rows]
    uid_to_indices: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        uid_to_indices[r["uid"]].append(i)
    jobs, best_orig_by_uid = [], {}
    for uid, indices in uid_to_indices.items():
        score_lookup = {i: get_numeric_score(infos[i], r["score"]) for i, r in ((i, rows[i]) for i in indices)}
        best_score = max(score_lookup.values())
        best_orig_by_uid[uid] = best_score
        if best_score >= THRESHOLD:
            continue
        best_indices = [i for i, v in score_lookup.items() if abs(v - best_score) < 1e-6]  # line 1241
        best_indices.sort(key=lambda x: follow_count(infos[x]), reverse=True)
        best_indices = best_indices[:candidate_limit]
        jobs += [(uid, ci) for ci in best_indices]
    return jobs, best_orig_by_uid


def reference_mix(batch: dict, replace_top_n: int, candidate_limit: int, seed: str) -> dict:
    """The mixed batch the reference trains on, per uid: a list of
    (kind, row id, replaced rollout id or None, trained reward, advantage, temperature),
    with the groups the in-place fallback touched in `batch['inplace']`."""
    rows = batch["rows"]  # one per original: uid, rollout_id, score, follows, looped
    infos = [if_reward_info(r["score"], r["follows"], r["looped"]) for r in rows]
    token_rewards = [r["score"] for r in rows]
    uid_to_indices: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        uid_to_indices[r["uid"]].append(i)

    jobs, best_orig_by_uid = reference_candidates(rows, candidate_limit)

    # _generate_rewrite_with_rollout, lines 2061-2080: blank revisions are dropped
    results = []
    for uid, ci in jobs:
        for rev in batch["revisions"].get(rows[ci]["rollout_id"], []):
            if rev["text"].strip():
                results.append({"uid": uid, "cand": ci, **rev})
    out: dict = {"rows": None, "inplace": set()}
    if not results:  # lines 2254-2259: the whole-batch rule
        out["rows"] = _finish(rows, token_rewards, [None] * len(rows), uid_to_indices, {})
        return out

    rw_scores = [r["score"] for r in results]
    rw_numeric = [get_numeric_score(if_reward_info(r["score"], r["follows"], r["looped"]), r["score"])
                  for r in results]
    # the bonus, lines 2264-2305
    best_rewrite_by_idx: dict[int, float] = {}
    for i, item in enumerate(results):
        prev = best_rewrite_by_idx.get(item["cand"])
        if prev is None or rw_scores[i] > prev:
            best_rewrite_by_idx[item["cand"]] = rw_scores[i]
    for cand_idx, rw_score in best_rewrite_by_idx.items():
        orig_score = float(token_rewards[cand_idx])
        new_score = orig_score + ALPHA * (rw_score - orig_score)
        if abs(new_score - orig_score) < 1e-12:
            continue
        token_rewards[cand_idx] = new_score

    # selection, lines 2330-2364
    rewrites_by_uid: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(results):
        rewrites_by_uid[item["uid"]].append(i)
    selected_rewrites_by_uid = {}
    for uid_base, items in rewrites_by_uid.items():
        orig_best = best_orig_by_uid.get(uid_base, float("-inf"))
        sorted_items = sorted(items, key=lambda i: rw_numeric[i], reverse=True)
        selected, chosen = [], set()
        for i in sorted_items:
            if rw_numeric[i] > orig_best:
                selected.append(i)
                chosen.add(i)
                if len(selected) >= replace_top_n:
                    break
        if len(selected) < replace_top_n:
            for i in sorted_items:
                if rw_numeric[i] >= orig_best and i not in chosen:
                    selected.append(i)
                    chosen.add(i)
                    if len(selected) >= replace_top_n:
                        break
        selected_rewrites_by_uid[uid_base] = selected

    # fallback order, lines 2370-2392: (numeric, follow) descending, stable
    best_orig_items_by_uid = {}
    for uid_base, indices in uid_to_indices.items():
        scored = [{"orig_idx": i, "numeric": get_numeric_score(infos[i], token_rewards[i]),
                   "follow": follow_count(infos[i])} for i in indices]
        scored.sort(key=lambda x: (x["numeric"], x["follow"]), reverse=True)
        best_orig_items_by_uid[uid_base] = scored

    # lines 2418-2441
    selected_by_uid = {}
    for uid_base in {uid for uid, _ in jobs}:
        items = [("rewrite", i) for i in selected_rewrites_by_uid.get(uid_base, [])]
        if len(items) < replace_top_n:
            for orig in best_orig_items_by_uid.get(uid_base, []):
                items.append(("orig", orig["orig_idx"]))
                if len(items) >= replace_top_n:
                    break
        if items:
            selected_by_uid[uid_base] = items

    # in-place replacement, lines 2460-2557. The victims: herl's seeded order (see above)
    content = [("rollout", r["rollout_id"]) for r in rows]  # what each batch row now holds
    temperature = [None] * len(rows)
    replaced: dict[int, str] = {}
    for uid_base, infos_sel in selected_by_uid.items():
        indices = sorted(uid_to_indices[uid_base],
                         key=lambda i: hashlib.md5(f"{seed}:{rows[i]['rollout_id']}".encode()).hexdigest())
        written: set[int] = set()
        for slot_idx, (source, idx) in enumerate(infos_sel):
            replace_idx = indices[slot_idx]
            if source == "rewrite":
                rev = results[idx]
                content[replace_idx] = ("hindsight", rev["revision_id"])
                token_rewards[replace_idx] = rw_scores[idx]
            else:
                if idx in written:  # reads a row this loop already overwrote
                    out["inplace"].add(uid_base)
                content[replace_idx] = ("duplicate", content[idx][1])
                token_rewards[replace_idx] = token_rewards[idx]
            written.add(replace_idx)
            replaced[replace_idx] = rows[replace_idx]["rollout_id"]
    # every log-prob is taken at the rollout temperature (meta_info temperature), revisions too
    temperature = [ROLLOUT_T] * len(rows)
    out["rows"] = _finish(rows, token_rewards, temperature, uid_to_indices, replaced, content)
    return out


def _finish(rows, token_rewards, temperature, uid_to_indices, replaced, content=None) -> dict:
    """compute_grpo_outcome_advantage, core_algos.py lines 303-330, per uid."""
    content = content or [("rollout", r["rollout_id"]) for r in rows]
    temperature = [t if t is not None else ROLLOUT_T for t in temperature]
    by_uid = {}
    for uid, indices in uid_to_indices.items():
        scores = [token_rewards[i] for i in indices]
        mean, std = (0.0, 1.0) if len(scores) == 1 else (statistics.fmean(scores), statistics.stdev(scores))
        by_uid[uid] = sorted((content[i][0], content[i][1], replaced.get(i), token_rewards[i],
                              (token_rewards[i] - mean) / (std + EPS), temperature[i]) for i in indices)
    return by_uid


# --- herl --------------------------------------------------------------------------------

def herl_mix(batch: dict, replace_top_n: int, seed: str) -> dict:
    ro, rw, hs = [], [], []
    for r in batch["rows"]:
        ro.append({"run_id": "r", "iteration": 0, "rollout_id": r["rollout_id"], "prompt_id": r["uid"],
                   "sample_index": r["sample_index"], "prompt_text": "p", "prompt_token_ids": [1],
                   "response_text": "a", "response_token_ids": [2], "finish_reason": "stop", "num_tokens": 1,
                   "seed": 0, "snapshot_id": "s", "logprobs": None, "temperature": ROLLOUT_T})
        rw.append({"run_id": "r", "iteration": 0, "rollout_id": r["rollout_id"], "prompt_id": r["uid"],
                   "reward": r["score"], "items_met": sum(r["follows"]), "items_scored": len(r["follows"]),
                   "items_unknown": 0, "looped": r["looped"]})
    for cand, revs in batch["revisions"].items():
        for rev in revs:
            hs.append({"run_id": "r", "iteration": 0, "revision_id": rev["revision_id"], "candidate_rollout_id": cand,
                       "prompt_id": cand.split(":")[1], "revision_index": rev["index"], "hindsight_prompt_text": "H",
                       "prompt_token_ids": [3], "response_text": rev["text"], "response_token_ids": [4],
                       "finish_reason": "stop", "num_tokens": 1, "seed": 0, "snapshot_id": "s", "logprobs": None,
                       "temperature": REVISION_T, "reward": rev["score"], "items_met": sum(rev["follows"]),
                       "items_scored": len(rev["follows"]), "items_unknown": 0, "looped": rev["looped"]})
    tables = [pa.Table.from_pylist(rows, schema=TABLES[name].schema)
              for rows, name in ((ro, "rollouts"), (rw, "rewards"), (hs, "hindsight"))]
    params = dict(threshold=THRESHOLD, skip_looping=True, tie_tolerance=TOL, bonus=True, alpha=ALPHA,
                  replace_top_n=replace_top_n, fallback=True, std_normalize=True, eps=EPS, seed=seed,
                  hindsight_prompt=True, revision_logprobs_at_rollout_temperature=True, whitespace=WHITESPACE)
    out: dict = defaultdict(list)
    for r in advantages.compute_batch(*tables, params).to_pylist():
        row_id = r["revision_id"] if r["kind"] == "hindsight" else r["rollout_id"]
        out[r["prompt_id"]].append((r["kind"], row_id, r["replaced_rollout_id"], r["shaped_reward"],
                                    r["advantage"], r["temperature"]))
    return {uid: sorted(v) for uid, v in out.items()}


# --- random batches ----------------------------------------------------------------------

WEIGHT_SETS = [None, [0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4], [0.7, 0.2, 0.1], [1.0, 0.5, 0.25, 0.25]]
BLANKS = ["", " ", "\n\t", " \u00a0\u2028"]


def _score(met: list[int], weights: list[float]) -> float:
    """The weighted fraction herl's fraction / weighted rewards compute (summed in item order)."""
    return sum(w * m for w, m in zip(weights, met)) / sum(weights)


def _answer(rng: random.Random, weights: list[float]) -> dict:
    met = [int(rng.random() < 0.55) for _ in weights]
    looped = rng.random() < 0.15
    text = ("la la " * 120) if looped else "an answer"
    assert is_looping(text) == looped  # the rule herl records in rewards.looped
    return {"score": _score(met, weights), "follows": met, "looped": looped}


def random_batch(rng: random.Random) -> tuple[dict, int, int]:
    """(batch, replace_top_n, candidate_limit): 1-6 groups of one G."""
    g = rng.choice([1, 2, 4, 8])
    replace_top_n = rng.randint(1, g)
    candidate_limit = rng.choice([1, 2, 16])
    per_candidate = rng.choice([1, 1, 2])
    empty_rate = rng.choice([0.0, 0.2, 1.0])  # 1.0: every revision blank (the whole-batch rule)
    rows, revisions = [], {}
    for u in range(rng.randint(1, 6)):
        uid = f"u{u}"
        weights = rng.choice(WEIGHT_SETS) or [1.0] * rng.randint(1, 4)
        for j in range(g):
            rid = f"0:{uid}:{j}"
            rows.append({"uid": uid, "rollout_id": rid, "sample_index": j, **_answer(rng, weights)})
            revisions[rid] = []
            for i in range(per_candidate):
                rev = _answer(rng, weights)
                rev.update(index=i, revision_id=f"{rid}:rev-{i}",
                           text=rng.choice(BLANKS) if rng.random() < empty_rate else "a revision")
                revisions[rid].append(rev)
    return {"rows": rows, "revisions": revisions}, replace_top_n, candidate_limit


def herl_candidates(batch: dict, candidate_limit: int) -> list[str]:
    """The rollout ids herl's candidates.sql picks, in rank order per group."""
    ro = [{"run_id": "r", "iteration": 0, "rollout_id": r["rollout_id"], "prompt_id": r["uid"],
           "sample_index": r["sample_index"], "prompt_text": "p", "prompt_token_ids": [1], "response_text": "a",
           "response_token_ids": [2], "finish_reason": "stop", "num_tokens": 1, "seed": 0, "snapshot_id": "s",
           "logprobs": None, "temperature": ROLLOUT_T} for r in batch["rows"]]
    rw = [{"run_id": "r", "iteration": 0, "rollout_id": r["rollout_id"], "prompt_id": r["uid"], "reward": r["score"],
           "items_met": sum(r["follows"]), "items_scored": len(r["follows"]), "items_unknown": 0,
           "looped": r["looped"]} for r in batch["rows"]]
    tables = {"rollouts": pa.Table.from_pylist(ro, schema=TABLES["rollouts"].schema),
              "rewards": pa.Table.from_pylist(rw, schema=TABLES["rewards"].schema)}
    picked = herl.sql.run_sql_file("candidates", tables, {"threshold": THRESHOLD, "candidate_limit": candidate_limit,
                                                          "skip_looping": True, "tie_tolerance": TOL})
    return picked.column("rollout_id").to_pylist()


def _near_tie_below(batch: dict) -> bool:
    """A revision within TOL below its group's best (as chosen): herl ties it, the reference does not."""
    best: dict[str, float] = defaultdict(float)
    for r in batch["rows"]:
        best[r["uid"]] = max(best[r["uid"]], 0.0 if r["looped"] else r["score"])
    for cand, revs in batch["revisions"].items():
        uid = cand.split(":")[1]
        for rev in revs:
            chosen = 0.0 if rev["looped"] else rev["score"]
            if best[uid] - TOL <= chosen < best[uid]:
                return True
    return False


def compare(n_batches: int, seed: int = 0, stop_at_first: bool = False) -> dict:
    """Run the port and herl over seeded random batches; count what was compared, what
    differed and what the departures left out."""
    rng = random.Random(seed)
    stats = defaultdict(int)
    for b in range(n_batches):
        batch, replace_top_n, candidate_limit = random_batch(rng)
        # revisions exist only for candidates (the hindsight stage): the reference's, which
        # herl's candidates.sql must pick too, in the same order
        jobs, _ = reference_candidates(batch["rows"], candidate_limit)
        picked = [batch["rows"][ci]["rollout_id"] for _, ci in jobs]
        if herl_candidates(batch, candidate_limit) != picked:
            stats["differ"] += 1
            stats.setdefault("first", (b, "candidates", herl_candidates(batch, candidate_limit), picked))
            if stop_at_first:
                return stats
        batch = {"rows": batch["rows"], "revisions": {c: batch["revisions"][c] for c in picked}}
        sql_seed = f"{seed}:{b}"
        if _near_tie_below(batch):
            stats["left_out_near_tie"] += 1
            continue
        want = reference_mix(batch, replace_top_n, candidate_limit, sql_seed)
        got = herl_mix(batch, replace_top_n, sql_seed)
        stats["batches"] += 1
        stats["groups"] += len(want["rows"])
        for uid, rows in want["rows"].items():
            if uid in want["inplace"]:
                stats["left_out_inplace"] += 1
                continue
            if not _same(got.get(uid, []), rows):
                stats["differ"] += 1
                stats.setdefault("first", (b, uid, got.get(uid), rows))
                if stop_at_first:
                    return stats
            kinds = [r[0] for r in rows]
            stats["hindsight_rows"] += kinds.count("hindsight")
            stats["duplicate_rows"] += kinds.count("duplicate")
        if not any(r[0] != "rollout" for rows in want["rows"].values() for r in rows) and any(
                batch["revisions"].values()):
            stats["whole_batch_rule"] += 1
        stats["looping"] += sum(r["looped"] for r in batch["rows"])
    return stats


def _same(got: list, want: list) -> bool:
    if [g[:3] for g in got] != [w[:3] for w in want]:
        return False
    return all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for g, w in zip(got, want) for a, b in zip(g[3:], w[3:]))


def test_herl_mixes_as_the_reference_does():
    stats = compare(300)
    assert stats["differ"] == 0, stats.get("first")
    # the batches exercise what the rules are about
    assert stats["batches"] >= 250 and stats["hindsight_rows"] > 50 and stats["duplicate_rows"] > 50
    assert stats["whole_batch_rule"] > 5 and stats["looping"] > 100
    # the departures leave little out
    assert stats["left_out_near_tie"] < 30 and stats["left_out_inplace"] < stats["groups"] / 10


# each mutation reverts one rule in herl's SQL; the differential must see it
MUTATIONS = {
    "ordering (the first-ranked candidate's revision wins)": (
        "advantages.sql", "order by tier, choice_reward desc, candidate_items_met desc",
        "order by tier, candidate_items_met desc"),
    "tie rule (candidates by exact equality)": (
        "candidates.sql", "abs(o.choice_reward - f.best_reward) < $tie_tolerance",
        "abs(o.choice_reward - f.best_reward) < 0 * $tie_tolerance"),
    "whole-batch rule (copies without any usable revision)": (
        "advantages.sql", "    where (select found from any_usable)\n", "\n"),
    "repetition rule (looping answers chosen by their reward)": (
        "originals.sql", "case when skip_looping and w.looped then 0.0 else w.reward end", "w.reward"),
    "temperature rule (the parameter kept, ignored)": (
        "advantages.sql", "case when $revision_logprobs_at_rollout_temperature then c.temperature else h.temperature end",
        "case when $revision_logprobs_at_rollout_temperature is null then c.temperature else h.temperature end"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_the_differential_catches_a_reverted_rule(name, tmp_path, monkeypatch):
    file, old, new = MUTATIONS[name]
    for sql in Path(herl.sql.SQL_DIR).glob("*.sql"):
        text = sql.read_text()
        if sql.name == file:
            assert old in text, f"{file} no longer holds the rule this mutation reverts"
            text = text.replace(old, new)
        (tmp_path / sql.name).write_text(text)
    monkeypatch.setattr(herl.sql, "SQL_DIR", tmp_path)
    assert compare(300, stop_at_first=True)["differ"] > 0, name


def test_the_issue_example_tied_best_drafts():
    """Drafts 0 and 1 both score 0.5, their revisions 0.75 and 1.0: the 1.0 revision joins
    (herl had kept the first-ranked candidate's 0.75 one), whatever the seed."""
    rows = [{"uid": "t", "rollout_id": f"0:t:{j}", "sample_index": j, "score": s, "follows": f, "looped": False}
            for j, (s, f) in enumerate([(0.5, [1, 1, 0, 0]), (0.5, [1, 1, 0, 0]), (0.25, [1, 0, 0, 0]),
                                        (0.0, [0, 0, 0, 0])])]
    revs = {f"0:t:{j}": [{"score": s, "follows": [1] * int(4 * s) + [0] * (4 - int(4 * s)), "looped": False,
                          "index": 0, "revision_id": f"0:t:{j}:rev-0", "text": "r"}] for j, s in ((0, 0.75), (1, 1.0))}
    for seed in ("0:0", "3:1", "7:2"):
        got = herl_mix({"rows": rows, "revisions": revs}, 1, seed)["t"]
        assert [r[1] for r in got if r[0] == "hindsight"] == ["0:t:1:rev-0"]
        assert got == reference_mix({"rows": rows, "revisions": revs}, 1, 16, seed)["rows"]["t"]
