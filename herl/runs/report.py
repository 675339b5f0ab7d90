"""`herl report` / `herl view`: a run as one self-contained HTML page, no server needed.

    herl report runs/R [--out report.html] [--iterations 0,5,11]
    herl view runs/R            # writes runs/R/report.html and prints its file:// URL

Reads: prompts, rollouts, rewards, verdicts, hindsight, hindsight_verdicts, batch and the
curves of herl.runs.plot (read-only DuckDB over the run). Writes one HTML file (atomically)
holding the data as JSON and the page (herl/templates/report.html) that shows it: the
curves; per iteration, the prompts with their group's mean reward; for a prompt, every
answer of the group with its reward, advantage and the verdict on each rubric item; and
for each revision, the hindsight prompt, the revision beside its draft as a word diff,
its reward and verdicts, whether it was mixed into the batch, whom it replaced and its
advantage. Model text is shown as text, never as markup.
"""

from __future__ import annotations

import base64
import difflib
import json
import re
import tempfile
from pathlib import Path

from herl.grading.rubric import user_prompt
from herl.runs.query import connect_run
from schemas.tables import atomic_write, refuse_special

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "report.html"


def word_diff(before: str, after: str) -> list[list[str]]:
    """[[op, text], ...] turning `before` into `after` word by word: op is "=" (both),
    "-" (only before) or "+" (only after)."""
    a, b = re.findall(r"\s+|\w+|[^\w\s]", before), re.findall(r"\s+|\w+|[^\w\s]", after)
    out: list[list[str]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            out.append(["=", "".join(a[i1:i2])])
            continue
        if i2 > i1:
            out.append(["-", "".join(a[i1:i2])])
        if j2 > j1:
            out.append(["+", "".join(b[j1:j2])])
    return out


def _rows(con, sql: str, params: list) -> list[dict]:
    cur = con.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def _has(con, table: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [table]).fetchone()[0])


def report_data(run_dir: Path, iterations: list[int] | None = None) -> dict:
    """The page's data: {run_id, iterations: {k: [prompt, ...]}} (see the module docstring)."""
    con = connect_run(run_dir)
    ks = [r[0] for r in con.execute("SELECT DISTINCT iteration FROM rollouts ORDER BY 1").fetchall()]
    if iterations is not None:
        ks = [k for k in ks if k in set(iterations)]
    data: dict = {"run_id": run_dir.name, "iterations": {}}
    for k in ks:
        prompts = _rows(con, "SELECT prompt_id, messages, rubric FROM prompts WHERE iteration = ? ORDER BY prompt_id", [k])
        answers = _rows(con, """
            SELECT r.prompt_id, r.rollout_id, r.sample_index, r.response_text, r.finish_reason, r.num_tokens,
                   w.reward, b.advantage, b.kind AS batch_kind
            FROM rollouts r LEFT JOIN rewards w USING (iteration, rollout_id)
            LEFT JOIN batch b ON b.iteration = r.iteration AND b.sample_id = r.rollout_id
            WHERE r.iteration = ? ORDER BY r.prompt_id, r.sample_index""", [k])
        verdicts = _rows(con, """SELECT sample_id, item_index, verdict, verdict_strict, verdict_loose, grader, detail
                                 FROM verdicts WHERE iteration = ? ORDER BY sample_id, item_index""", [k])
        revisions, rev_verdicts, mixed = [], [], []
        if _has(con, "hindsight"):
            revisions = _rows(con, """
                SELECT revision_id, candidate_rollout_id, prompt_id, hindsight_prompt_text, response_text,
                       finish_reason, reward FROM hindsight WHERE iteration = ? ORDER BY revision_id""", [k])
        if _has(con, "hindsight_verdicts"):
            rev_verdicts = _rows(con, """SELECT sample_id, item_index, verdict, verdict_strict, verdict_loose, grader,
                                        detail FROM hindsight_verdicts WHERE iteration = ? ORDER BY sample_id, item_index""", [k])
        if _has(con, "batch"):
            mixed = _rows(con, """SELECT coalesce(revision_id, rollout_id) AS trained_id, sample_id, kind, replaced_rollout_id, advantage, shaped_reward,
                                  hindsight_prompt FROM batch WHERE iteration = ? AND is_hindsight""", [k])
        by_sample: dict[str, list[dict]] = {}
        for v in verdicts + rev_verdicts:
            by_sample.setdefault(v.pop("sample_id"), []).append(v)
        in_batch = {m["trained_id"]: m for m in mixed}
        replaced_by = {m["replaced_rollout_id"]: m["trained_id"] for m in mixed if m["replaced_rollout_id"]}
        drafts = {a["rollout_id"]: a["response_text"] for a in answers}
        out = []
        for p in prompts:
            group = [a for a in answers if a["prompt_id"] == p["prompt_id"]]
            for a in group:
                a["verdicts"] = by_sample.get(a["rollout_id"], [])
                a["replaced_by"] = replaced_by.get(a["rollout_id"])
            revs = []
            for r in (r for r in revisions if r["prompt_id"] == p["prompt_id"]):
                m = in_batch.get(r["revision_id"])
                revs.append({**r, "verdicts": by_sample.get(r["revision_id"], []),
                             "diff": word_diff(drafts.get(r["candidate_rollout_id"], ""), r["response_text"]),
                             "mixed": m is not None, "replaced": m["replaced_rollout_id"] if m else None,
                             "advantage": m["advantage"] if m else None})
            rewards = [a["reward"] for a in group if a["reward"] is not None]
            out.append({"prompt_id": p["prompt_id"], "messages": p["messages"], "text": user_prompt(p["messages"]),
                        "rubric": [{"item_id": it["item_id"], "description": it["description"], "weight": it["weight"],
                                    "kind": it["kind"]} for it in p["rubric"]],
                        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
                        "best_reward": max(rewards) if rewards else None, "answers": group, "revisions": revs})
        data["iterations"][str(k)] = out
    return data


def write_report(run_dir: str | Path, out: str | Path | None = None, iterations: list[int] | None = None) -> Path:
    """Write the page; returns its path (default RUN/report.html)."""
    from herl.runs.plot import plot_run

    run_dir = Path(run_dir).resolve()
    out = Path(out) if out else run_dir / "report.html"
    data = report_data(run_dir, iterations)
    refuse_special(out)  # before the work: a device, FIFO or folder there is never replaced
    with tempfile.TemporaryDirectory(prefix="herl-report-") as scratch:
        png = plot_run(run_dir, Path(scratch) / "curves.png")
        data["curves_png"] = base64.b64encode(png.read_bytes()).decode("ascii")
    # JSON inside <script>: "<" escaped so no text of a model can close the element
    payload = json.dumps(data, ensure_ascii=False, default=str).replace("<", "\\u003c")
    page = TEMPLATE.read_text().replace("/*HERL_DATA*/null", payload)
    with atomic_write(out, "w") as fh:  # never over a device, FIFO or folder (refuse_special)
        fh.write(page)
    return out
