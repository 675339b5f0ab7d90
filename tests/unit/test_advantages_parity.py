"""The advantages stage against an independent oracle of the authors' rules.

The oracle below is written from the reference's `_augment_with_rewrite_he`
(sikelifei/HeRL, verl/trainer/ppo/ray_trainer.py) and docs/algorithm.md steps 3 and 6-8,
in plain Python over hand-made groups, never from herl's SQL:

- a group fails when its best original reward is below the threshold; its candidates are
  the best-reward answers, more items met first, then sample order;
- a revision is empty when nothing is left after Python's str.strip();
- bonus: r <- r + alpha (r_rev - r), r_rev the candidate's best non-empty revision;
- the non-empty revisions of a failed group are sorted by reward, highest first (a
  stable sort over candidate order, then revision order); those above the group's best
  original are taken first, then those equal to it, at most replace_top_n;
- slots left over get copies of the group's originals, best first (reward, then items
  met, then sample order), carrying the original's shaped reward;
- each fill replaces a member; herl's "random member" is seeded: members ordered by
  md5(seed:rollout_id), the i-th fill replaces the i-th (the one rule taken from herl,
  since the reference draws it from an unseeded generator);
- advantages: (r - mean) / (unbiased std + eps) over the mixed group; a group of one gets
  its shaped reward.
"""

from __future__ import annotations

import hashlib
import statistics

import pyarrow as pa
import pytest

from herl.sql import WHITESPACE
from schemas.tables import TABLES
from stages import advantages

SEED = "3:1"
ALPHA, EPS, THRESHOLD = 0.05, 1e-6, 1.0

# prompt id -> [(reward, items met)] per sample index
GROUPS = {
    # tied best drafts 0 and 1 (0.5, 2 items each); draft 1's revision scores higher
    "tied": [(0.5, 2), (0.5, 2), (0.25, 1), (0.0, 0)],
    # the only candidate's revision is worse: a negative bonus, nothing qualifies
    "worse": [(0.25, 1), (0.5, 2), (0.0, 0), (0.25, 1)],
    # nothing qualifies; three distinct rewards, so replace_top_n = 2 needs the second best
    "none": [(0.0, 0), (0.75, 3), (0.5, 2), (0.75, 2)],
    # one revision beats the group (tier 1), another ties it (tier 2)
    "tiers": [(0.5, 2), (0.25, 1), (0.5, 1), (0.0, 0)],
    # the best revision is empty (Unicode whitespace only); a tie from a lower candidate
    "empty": [(0.5, 2), (0.5, 1), (0.25, 1), (0.0, 0)],
    # two revisions per candidate, equal rewards: candidate rank, then revision index
    "multi": [(0.25, 1), (0.25, 1), (0.0, 0), (0.0, 0)],
    # solved: untouched
    "solved": [(1.0, 4), (0.5, 2), (1.0, 4), (0.75, 3)],
    # a group of one that failed and was revised
    "solo": [(0.5, 2)],
}

# (candidate rollout id, revision index, reward, text)
REVISIONS = [
    ("0:tied:0", 0, 0.75, "r"),
    ("0:tied:1", 0, 1.0, "r"),
    ("0:worse:1", 0, 0.25, "r"),
    ("0:none:1", 0, 0.5, "r"),
    ("0:none:3", 0, 0.25, "r"),
    ("0:tiers:0", 0, 0.5, "r"),
    ("0:tiers:2", 0, 1.0, "r"),
    ("0:empty:0", 0, 1.0, " \u00a0\u2028\t"),
    ("0:empty:1", 0, 0.5, "r"),
    ("0:multi:0", 0, 0.5, "r"),
    ("0:multi:0", 1, 0.75, "r"),
    ("0:multi:1", 0, 0.75, "r"),
    ("0:multi:1", 1, 0.5, "r"),
    ("0:solo:0", 0, 0.25, "r"),
]


def rid(pid: str, j: int) -> str:
    return f"0:{pid}:{j}"


def oracle(groups: dict, revisions: list, replace_top_n: int, bonus: bool = True, fallback: bool = True) -> dict:
    """{prompt_id: sorted [(kind, trained row id, replaced_rollout_id or None, reward, shaped, advantage)]}."""
    out = {}
    for pid, members in groups.items():
        ids = [rid(pid, j) for j in range(len(members))]
        reward = {i: r for i, (r, _) in zip(ids, members)}
        met = {i: m for i, (_, m) in zip(ids, members)}
        best = max(reward.values())
        failed = best < THRESHOLD
        # candidates: best-reward answers, more items met first (stable: sample order)
        candidates = sorted([i for i in ids if reward[i] == best], key=lambda i: -met[i]) if failed else []
        rank = {c: n for n, c in enumerate(candidates)}
        revs = [r for r in revisions if r[0] in rank]
        revs.sort(key=lambda r: (rank[r[0]], r[1]))  # the order the jobs were generated in
        usable = [r for r in revs if r[3].strip()]
        shaped = dict(reward)
        if bonus:
            for c in candidates:
                mine = [r[2] for r in usable if r[0] == c]
                if mine:
                    shaped[c] = reward[c] + ALPHA * (max(mine) - reward[c])
        mixed = {i: ("rollout", i, None, reward[i], shaped[i]) for i in ids}
        if failed and revs:
            by_reward = sorted(usable, key=lambda r: r[2], reverse=True)
            chosen = [r for r in by_reward if r[2] > best][:replace_top_n]
            chosen += [r for r in by_reward if r[2] == best][: replace_top_n - len(chosen)]
            fills = [("hindsight", f"{r[0]}:rev-{r[1]}", r[2], r[2]) for r in chosen]
            if fallback:
                originals = sorted(ids, key=lambda i: (-reward[i], -met[i]))
                fills += [("duplicate", o, reward[o], shaped[o]) for o in originals[: replace_top_n - len(fills)]]
            victims = sorted(ids, key=lambda i: hashlib.md5(f"{SEED}:{i}".encode()).hexdigest())
            for (kind, source, r, s), victim in zip(fills, victims):
                del mixed[victim]
                mixed[f"fill:{source}"] = (kind, source, victim, r, s)
        rows = list(mixed.values())
        values = [row[4] for row in rows]
        if len(rows) == 1:
            adv = [values[0]]
        else:
            mean, std = statistics.fmean(values), statistics.stdev(values)
            adv = [(v - mean) / (std + EPS) for v in values]
        out[pid] = sorted((*row, a) for row, a in zip(rows, adv))
    return out


def herl_batch(groups: dict, revisions: list, replace_top_n: int, bonus: bool = True, fallback: bool = True) -> dict:
    ro, rw, hs = [], [], []
    for pid, members in groups.items():
        for j, (reward, met) in enumerate(members):
            ro.append({"run_id": "r", "iteration": 0, "rollout_id": rid(pid, j), "prompt_id": pid, "sample_index": j,
                       "prompt_text": pid, "prompt_token_ids": [1], "response_text": "a",
                       "response_token_ids": [2], "finish_reason": "stop", "num_tokens": 1, "seed": 0,
                       "snapshot_id": "s", "logprobs": None, "temperature": 1.0})
            rw.append({"run_id": "r", "iteration": 0, "rollout_id": rid(pid, j), "prompt_id": pid, "reward": reward,
                       "items_met": met, "items_scored": 4, "items_unknown": 0})
    for cand, index, reward, text in revisions:
        hs.append({"run_id": "r", "iteration": 0, "revision_id": f"{cand}:rev-{index}", "candidate_rollout_id": cand,
                   "prompt_id": cand.split(":")[1], "revision_index": index, "hindsight_prompt_text": "H",
                   "prompt_token_ids": [3], "response_text": text, "response_token_ids": [4],
                   "finish_reason": "stop", "num_tokens": 1, "seed": 0, "snapshot_id": "s", "logprobs": None,
                   "temperature": 1.0, "reward": reward, "items_met": 0, "items_scored": 4, "items_unknown": 0})
    tables = [pa.Table.from_pylist(rows, schema=TABLES[name].schema)
              for rows, name in ((ro, "rollouts"), (rw, "rewards"), (hs, "hindsight"))]
    params = dict(threshold=THRESHOLD, bonus=bonus, alpha=ALPHA, replace_top_n=replace_top_n, fallback=fallback,
                  std_normalize=True, eps=EPS, seed=SEED, hindsight_prompt=True,
                  revision_logprobs_at_rollout_temperature=True, whitespace=WHITESPACE)
    out: dict = {}
    for r in advantages.compute_batch(*tables, params).to_pylist():
        out.setdefault(r["prompt_id"], []).append(
            (r["kind"], r["revision_id"] or r["rollout_id"], r["replaced_rollout_id"], r["reward"], r["shaped_reward"], r["advantage"]))
    return {pid: sorted(rows) for pid, rows in out.items()}


def _same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for pid in want:
        assert [row[:3] for row in got[pid]] == [row[:3] for row in want[pid]], pid
        for g, w in zip(got[pid], want[pid]):
            assert g[3:] == pytest.approx(w[3:], abs=1e-12, rel=1e-12), pid


@pytest.mark.parametrize("replace_top_n", [1, 2, 3])
@pytest.mark.parametrize("bonus,fallback", [(True, True), (False, True), (True, False)])
def test_advantages_match_the_oracle(replace_top_n, bonus, fallback):
    _same(herl_batch(GROUPS, REVISIONS, replace_top_n, bonus, fallback),
          oracle(GROUPS, REVISIONS, replace_top_n, bonus, fallback))


def test_the_oracle_reads_the_cases_as_intended():
    """The cases exercise what they are named for (so the parity test means something)."""
    one, two = oracle(GROUPS, REVISIONS, 1), oracle(GROUPS, REVISIONS, 2)
    kept = lambda g, pid: [r[1] for r in g[pid] if r[0] == "hindsight"]  # noqa: E731
    dups = lambda g, pid: [r[1] for r in g[pid] if r[0] == "duplicate"]  # noqa: E731
    assert kept(one, "tied") == ["0:tied:1:rev-0"]  # the best revision, not the first candidate's
    assert kept(one, "tiers") == ["0:tiers:2:rev-0"] and sorted(kept(two, "tiers")) == [
        "0:tiers:0:rev-0", "0:tiers:2:rev-0"]
    assert dups(one, "none") == ["0:none:1"] and sorted(dups(two, "none")) == ["0:none:1", "0:none:3"]
    assert dups(one, "worse") == ["0:worse:1"]
    assert [r[4] for r in one["worse"] if r[1] == "0:worse:1"][0] == pytest.approx(0.5 + ALPHA * (0.25 - 0.5))
    # the empty 1.0 revision is dropped; the other (0.5) ties the group's best: tier 2
    assert kept(one, "empty") == ["0:empty:1:rev-0"]
    assert [r[4] for r in one["empty"] if r[1] == "0:empty:0"] in ([], [0.5])  # no bonus from an empty one
    assert kept(one, "multi") == ["0:multi:0:rev-1"]  # 0.75 twice: candidate 0 before candidate 1
    assert kept(two, "multi") == ["0:multi:0:rev-1", "0:multi:1:rev-0"]
    assert all(r[0] == "rollout" for r in one["solved"])
    assert len(one["solo"]) == 1


def test_the_issue_example_tied_best_drafts():
    """Drafts 0 and 1 both score 0.5, their revisions 0.75 and 1.0: the 1.0 revision joins
    (herl had kept the first-ranked candidate's 0.75 one), whatever the seed."""
    got = herl_batch({"tied": GROUPS["tied"]}, REVISIONS[:2], 1)["tied"]
    rev = [r for r in got if r[0] == "hindsight"]
    assert [r[1] for r in rev] == ["0:tied:1:rev-0"]
    assert rev[0][5] == max(r[5] for r in got)
