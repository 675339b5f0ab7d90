"""The SQL models (herl/sql/) pinned with hand-computed numbers: candidates, bonus,
selection, replacement, group advantages (against numpy), the batch's temperatures."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest
import torch

from herl.sql import WHITESPACE, run_sql_file
from herl.training.batching import batch_sequences
from herl.training.loss import policy_loss
from schemas.tables import TABLES
from stages import advantages

SEED = "0:0"


def _rollouts(groups: dict[str, list[tuple[float, int]]], temperature: float = 1.0):
    """groups: prompt_id -> [(reward, items_met), ...]; returns (rollouts, rewards) tables."""
    ro, rw = [], []
    for pid, members in groups.items():
        for j, (reward, met) in enumerate(members):
            rid = f"0:{pid}:{j}"
            ro.append({"run_id": "r", "iteration": 0, "rollout_id": rid, "prompt_id": pid, "sample_index": j,
                       "prompt_text": pid, "prompt_token_ids": [1, 2], "response_text": f"a{j}",
                       "response_token_ids": [10 + j], "finish_reason": "stop", "num_tokens": 1, "seed": 0,
                       "snapshot_id": "s", "logprobs": None, "temperature": temperature})
            rw.append({"run_id": "r", "iteration": 0, "rollout_id": rid, "prompt_id": pid, "reward": reward,
                       "items_met": met, "items_scored": 4, "items_unknown": 0})
    return (pa.Table.from_pylist(ro, schema=TABLES["rollouts"].schema),
            pa.Table.from_pylist(rw, schema=TABLES["rewards"].schema))


def _revisions(revs: list[tuple], temperature: float = 0.3):
    """revs: [(candidate rollout id, prompt id, reward[, text])] -> hindsight table."""
    rows = [{"run_id": "r", "iteration": 0, "revision_id": f"{cand}:rev-0", "candidate_rollout_id": cand,
             "prompt_id": pid, "revision_index": 0, "hindsight_prompt_text": "H", "prompt_token_ids": [7, 7, 7],
             "response_text": text[0] if text else "rev", "response_token_ids": [99], "finish_reason": "stop",
             "num_tokens": 1, "seed": 0, "snapshot_id": "s", "logprobs": None, "temperature": temperature, "reward": reward, "items_met": 0,
             "items_scored": 4, "items_unknown": 0} for cand, pid, reward, *text in revs]
    return pa.Table.from_pylist(rows, schema=TABLES["hindsight"].schema)


def _params(**kw):
    base = dict(threshold=1.0, skip_looping=True, tie_tolerance=1e-6, bonus=True, alpha=0.05, replace_top_n=1, fallback=True, std_normalize=True,
                eps=1e-6, seed=SEED, hindsight_prompt=True, revision_logprobs_at_rollout_temperature=False,
                whitespace=WHITESPACE)
    return {**base, **kw}


def _victims(pid: str, n: int, g: int) -> list[str]:
    ids = [f"0:{pid}:{j}" for j in range(g)]
    return sorted(ids, key=lambda rid: hashlib.md5(f"{SEED}:{rid}".encode()).hexdigest())[:n]


def compute_batch(rollouts, rewards, hindsight, params):
    """The advantages stage's batch, with each row's token lists joined as the train job
    joins them (herl/sql/sequences.sql)."""
    batch = advantages.compute_batch(rollouts, rewards, hindsight, params)
    tokens = batch_sequences(batch, rollouts, hindsight).select(
        ["sample_id", "prompt_token_ids", "response_token_ids", "engine_logprobs"])
    assert tokens.num_rows == batch.num_rows
    by_id = {r["sample_id"]: r for r in tokens.to_pylist()}
    return pa.Table.from_pylist([{**r, **by_id[r["sample_id"]]} for r in batch.to_pylist()])


def _by_prompt(batch) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in batch.to_pylist():
        out.setdefault(r["prompt_id"], []).append(r)
    return out


GROUPS = {
    "p": [(0.5, 2), (0.25, 1), (0.5, 1), (0.0, 0)],  # failed; best 0.5 twice
    "q": [(1.0, 4), (1.0, 4), (0.5, 2), (1.0, 4)],  # solved: untouched
    "r": [(0.25, 1), (0.0, 0), (0.25, 2), (0.0, 0)],  # failed; its revision does not qualify
}


def test_candidates_are_best_of_failed_groups_by_items_met():
    ro, rw = _rollouts(GROUPS)
    cands = run_sql_file("candidates", {"rollouts": ro, "rewards": rw}, {"threshold": 1.0, "candidate_limit": 16, "skip_looping": True, "tie_tolerance": 1e-6})
    got = [(c["prompt_id"], c["rollout_id"], c["candidate_rank"]) for c in cands.to_pylist()]
    # p: both 0.5 answers, the one with more items met first; r: both 0.25s; q solved
    assert got == [("p", "0:p:0", 1), ("p", "0:p:2", 2), ("r", "0:r:2", 1), ("r", "0:r:0", 2)]
    limited = run_sql_file("candidates", {"rollouts": ro, "rewards": rw}, {"threshold": 1.0, "candidate_limit": 1, "skip_looping": True, "tie_tolerance": 1e-6})
    assert [c["rollout_id"] for c in limited.to_pylist()] == ["0:p:0", "0:r:2"]
    # a lower threshold makes group r (best 0.25) pass
    lower = run_sql_file("candidates", {"rollouts": ro, "rewards": rw}, {"threshold": 0.25, "candidate_limit": 16, "skip_looping": True, "tie_tolerance": 1e-6})
    assert {c["prompt_id"] for c in lower.to_pylist()} == set()


def test_bonus_selection_replacement_and_advantages():
    ro, rw = _rollouts(GROUPS)
    hs = _revisions([("0:p:0", "p", 1.0), ("0:p:2", "p", 0.5), ("0:r:2", "r", 0.0)])
    batch = _by_prompt(compute_batch(ro, rw, hs, _params()))

    # every group keeps its size G = 4
    assert {pid: len(rows) for pid, rows in batch.items()} == {"p": 4, "q": 4, "r": 4}

    # group p: the 1.0 revision (beats best 0.5) replaces one seeded-random member
    p = {r["sample_id"]: r for r in batch["p"]}
    (victim,) = _victims("p", 1, 4)
    assert victim not in p
    rev = p["0:p:0:rev-0"]
    assert rev["kind"] == "hindsight" and rev["is_hindsight"] and rev["replaced_rollout_id"] == victim
    assert rev["prompt_token_ids"] == [7, 7, 7]  # trained after the hindsight prompt (reference default)
    # bonus: r + 0.05 * (r_rev - r) for candidates; others unchanged
    shaped = {"0:p:0": 0.5 + 0.05 * (1.0 - 0.5), "0:p:1": 0.25, "0:p:2": 0.5 + 0.05 * (0.5 - 0.5), "0:p:3": 0.0}
    for sid, value in shaped.items():
        if sid != victim:
            assert p[sid]["shaped_reward"] == pytest.approx(value)
    assert rev["shaped_reward"] == 1.0
    rewards = np.array([p[s]["shaped_reward"] for s in sorted(p)])
    expected = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-6)
    assert np.allclose([p[s]["advantage"] for s in sorted(p)], expected)

    # group q: solved, nothing replaced, plain GRPO advantages
    q = sorted(batch["q"], key=lambda r: r["sample_id"])
    assert all(r["kind"] == "rollout" for r in q)
    qr = np.array([1.0, 1.0, 0.5, 1.0])
    assert np.allclose([r["advantage"] for r in q], (qr - qr.mean()) / (qr.std(ddof=1) + 1e-6))

    # group r: revision 0.0 < best 0.25 does not qualify; the fallback copies the best
    # original (0:r:2: reward 0.25 with more items met) into a random member's place
    r = {x["sample_id"]: x for x in batch["r"]}
    (rvictim,) = _victims("r", 1, 4)
    dup = r["0:r:2:dup-1"]
    assert dup["kind"] == "duplicate" and not dup["is_hindsight"] and dup["replaced_rollout_id"] == rvictim
    assert dup["rollout_id"] == "0:r:2" and dup["revision_id"] is None and dup["response_token_ids"] == [12]
    # the candidate's bonus is negative here: 0.25 + 0.05 * (0.0 - 0.25), copied with it
    assert dup["shaped_reward"] == pytest.approx(0.25 - 0.05 * 0.25)


def test_fallback_off_and_std_off_and_original_prompt():
    ro, rw = _rollouts(GROUPS)
    hs = _revisions([("0:p:0", "p", 1.0), ("0:r:2", "r", 0.0)])
    batch = _by_prompt(compute_batch(ro, rw, hs, _params(fallback=False, std_normalize=False,
                                                          hindsight_prompt=False, bonus=False)))
    # no fallback: group r stays as sampled
    assert sorted(x["sample_id"] for x in batch["r"]) == [f"0:r:{j}" for j in range(4)]
    # no bonus: shaped = raw reward everywhere
    assert all(x["shaped_reward"] == x["reward"] for rows in batch.values() for x in rows)
    # Dr. GRPO: mean-centred only
    rr = np.array([0.25, 0.0, 0.25, 0.0])
    assert np.allclose([x["advantage"] for x in sorted(batch["r"], key=lambda x: x["sample_id"])], rr - rr.mean())
    # the revision is trained after the original prompt
    rev = next(x for x in batch["p"] if x["kind"] == "hindsight")
    assert rev["prompt_token_ids"] == [1, 2]


def test_tier_two_fills_when_too_few_beat_the_group():
    ro, rw = _rollouts(GROUPS)
    # p: one revision beats (1.0), one ties (0.5): with replace_top_n = 2 both join
    hs = _revisions([("0:p:0", "p", 1.0), ("0:p:2", "p", 0.5)])
    p = _by_prompt(compute_batch(ro, rw, hs, _params(replace_top_n=2)))["p"]
    kinds = sorted(x["kind"] for x in p)
    assert kinds == ["hindsight", "hindsight", "rollout", "rollout"]
    assert {x["replaced_rollout_id"] for x in p if x["kind"] == "hindsight"} == set(_victims("p", 2, 4))
    # with a single slot only the strictly better one is kept
    p1 = _by_prompt(compute_batch(ro, rw, hs, _params(replace_top_n=1)))["p"]
    assert [x["revision_id"] for x in p1 if x["kind"] == "hindsight"] == ["0:p:0:rev-0"]


def test_group_of_one_gets_mean_zero_std_one():
    ro, rw = _rollouts({"solo": [(0.75, 3)]})
    batch = compute_batch(ro, rw, _revisions([]), _params()).to_pylist()
    # the reference's mean 0, std 1 for a group of one: 0.75 / (1 + eps), not 0.75
    assert len(batch) == 1 and batch[0]["advantage"] == pytest.approx(0.75 / (1 + 1e-6), rel=1e-12, abs=0)
    assert batch[0]["advantage"] != 0.75


def test_equal_rewards_give_zero_advantage():
    ro, rw = _rollouts({"flat": [(0.5, 2)] * 4})
    batch = compute_batch(ro, rw, _revisions([]), _params()).to_pylist()
    assert all(x["advantage"] == 0.0 for x in batch)


# ---- the loss ---------------------------------------------------------------------


# ---- the hindsight prompt and the ablation modes ----------------------------------


@pytest.mark.parametrize("mode,replaced,shaped", [
    ("grpo", False, False),
    ("naive_he", True, False),
    ("he", True, False),
    ("herl", True, True),
])
def test_modes_on_a_hand_built_group(mode, replaced, shaped):
    """Which rows are replaced, which rewards are shaped, which tokens get which loss."""
    from schemas.config import load_config
    from stages.advantages import sql_params

    cfg = load_config(None, {"algorithm": mode})
    ro, rw = _rollouts(GROUPS)
    hs = _revisions([("0:p:0", "p", 1.0), ("0:r:2", "r", 0.0)])
    if not cfg.hindsight_enabled:  # the stage feeds no revisions to plain GRPO
        hs = hs.schema.empty_table()
    params = {**sql_params(cfg, 0), "seed": SEED}
    batch = _by_prompt(compute_batch(ro, rw, hs, params))
    p = {r["sample_id"]: r for r in batch["p"]}
    assert ("0:p:0:rev-0" in p) == replaced
    assert (_victims("p", 1, 4)[0] not in p) == replaced
    assert _victims("p", 1, 4)[0] != "0:p:0"  # with this seed the candidate itself stays in its group
    assert p["0:p:0"]["shaped_reward"] == pytest.approx(0.525 if shaped else 0.5)
    # the loss each token gets follows is_hindsight: only kept revisions use policy shaping
    assert {r["kind"]: r["is_hindsight"] for rows in batch.values() for r in rows} == (
        {"rollout": False, "hindsight": True, "duplicate": False} if replaced else {"rollout": False})
    assert cfg.bonus_enabled == shaped and cfg.hindsight_enabled == replaced
    # and the loss itself: the batch's rows through policy_loss, one token each (B = 12, T = 1);
    # at ratio 1 an on-policy token costs -A and a hindsight token -A * r / (r + gamma) = -A / 2
    rows = [r for pid in sorted(batch) for r in batch[pid]]
    adv = torch.tensor([r["advantage"] for r in rows])
    hind = torch.tensor([r["is_hindsight"] for r in rows])
    zeros, mask = torch.zeros(len(rows), 1), torch.ones(len(rows), 1, dtype=torch.bool)
    parts = policy_loss(zeros, zeros, adv, hind, mask, cfg.train, denominator=float(len(rows)))
    assert (parts.on_tokens, parts.hindsight_tokens) == ((11, 1) if replaced else (12, 0))
    assert parts.hindsight == pytest.approx(float(-(adv[hind] / 2).sum()) / len(rows), abs=1e-6)
    assert parts.on_policy == pytest.approx(float(-adv[~hind].sum()) / len(rows), abs=1e-6)


def test_ties_among_qualifying_revisions_go_to_the_higher_ranked_candidate():
    """Group p: candidates 0:p:0 (2 items met, rank 1) and 0:p:2 (1 item met, rank 2) both
    get a revision scoring 1.0; the reference keeps the higher-ranked candidate's, whatever
    the seed (herl picked at random before)."""
    ro, rw = _rollouts({"p": GROUPS["p"]})
    hs = _revisions([("0:p:2", "p", 1.0), ("0:p:0", "p", 1.0)])
    for seed in ("0:0", "1:0", "2:5", "x"):
        batch = _by_prompt(compute_batch(ro, rw, hs, _params(seed=seed)))
        kept = [r["revision_id"] for r in batch["p"] if r["kind"] == "hindsight"]
        assert kept == ["0:p:0:rev-0"], seed
    # a higher tier still wins over rank: the lower-ranked candidate's revision beats the group
    hs = _revisions([("0:p:2", "p", 1.0), ("0:p:0", "p", 0.5)])
    batch = _by_prompt(compute_batch(ro, rw, hs, _params()))
    assert [r["revision_id"] for r in batch["p"] if r["kind"] == "hindsight"] == ["0:p:2:rev-0"]


@pytest.mark.parametrize("text", ["", "   \n\t ", "\u00a0\u2028\u3000"])
def test_empty_revisions_are_dropped(text):
    """An empty revision neither joins its group nor earns its candidate a bonus: the slot
    falls back (a copy of the best original) like any revision that does not qualify, as
    long as some revision of the batch is usable; when none is (the whole-batch rule) the
    reference mixes nothing, so no copy either."""
    ro, rw = _rollouts({"p": GROUPS["p"], "r": GROUPS["r"]})
    usable_elsewhere = ("0:r:0", "r", 0.0)  # a non-empty revision in another group
    hs = _revisions([("0:p:0", "p", 1.0, text), usable_elsewhere])  # graded 1.0 (say, by an "exclude" check) but empty
    batch = _by_prompt(compute_batch(ro, rw, hs, _params()))
    kinds = sorted(r["kind"] for r in batch["p"])
    assert kinds == ["duplicate", "rollout", "rollout", "rollout"]
    assert {r["shaped_reward"] for r in batch["p"] if r["rollout_id"] == "0:p:0" and r["kind"] == "rollout"} == {0.5}  # no bonus
    # the whole-batch rule: no usable revision anywhere, no copies anywhere
    alone = _by_prompt(compute_batch(ro, rw, _revisions([("0:p:0", "p", 1.0, text), ("0:r:0", "r", 0.0, text)]),
                                     _params()))
    assert all(r["kind"] == "rollout" for rows in alone.values() for r in rows)
    kept = _by_prompt(compute_batch(ro, rw, _revisions([("0:p:0", "p", 1.0, "fine")]), _params()))
    assert sorted(r["kind"] for r in kept["p"]) == ["hindsight", "rollout", "rollout", "rollout"]


def test_batch_rows_carry_their_sampling_temperature():
    """Each batch row's temperature comes from the row it trains (rollouts and hindsight
    carry the temperature they were sampled at), not from the config."""
    ro, rw = _rollouts({"p": GROUPS["p"], "r": GROUPS["r"]}, temperature=0.7)
    hs = _revisions([("0:p:0", "p", 1.0), ("0:r:2", "r", 0.0)], temperature=0.3)
    rows = compute_batch(ro, rw, hs, _params()).to_pylist()
    assert {(r["kind"], r["temperature"]) for r in rows} == {("rollout", 0.7), ("hindsight", 0.3),
                                                             ("duplicate", 0.7)}




@pytest.mark.parametrize("choice,expected", [("rollout", 0.8), ("sampled", 0.3)])
def test_revision_logprobs_default_to_the_rollout_temperature(choice, expected):
    """Revisions are sampled at hindsight.temperature (0.3) but, by default, trained at the
    rollout temperature, as the reference computes every row's log-probs: at T = 0.3 the
    gradient of a confident token vanishes. train.revision_logprob_temperature = sampled
    keeps the sampling one."""
    from schemas.config import load_config
    from stages.advantages import sql_params

    cfg = load_config(None, {"rollout": {"temperature": 0.8}, "hindsight": {"temperature": 0.3},
                             "train": {"revision_logprob_temperature": choice}})
    ro, rw = _rollouts({"p": GROUPS["p"], "r": GROUPS["r"]}, temperature=0.8)
    hs = _revisions([("0:p:0", "p", 1.0), ("0:r:2", "r", 0.0)], temperature=0.3)
    rows = compute_batch(ro, rw, hs, {**sql_params(cfg, 0), "seed": SEED}).to_pylist()
    assert {(r["kind"], r["temperature"]) for r in rows} == {("rollout", 0.8), ("hindsight", expected),
                                                             ("duplicate", 0.8)}


def test_one_definition_of_an_empty_revision():
    """The stage's empty_revisions metric and the SQL's filter both use Python's str.strip()."""
    from herl.sql import is_blank

    for text, blank in (("", True), (" \t\n", True), ("\u00a0\x1c\u2028", True), ("\u200b", False), ("x", False)):
        assert is_blank(text) == blank == (not text.strip())
