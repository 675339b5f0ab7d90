"""The hindsight prompt: the instruction, the draft, and what the grader said of it.

Shared by the hindsight stage (training) and the self-improvement evaluation. Three
wordings ship (hindsight.template): `herl` (herl/templates/hindsight.j2: sections for
items satisfied / not satisfied / mistakes made / mistakes avoided / unclear, with
weights), `reference` (hindsight_reference.j2: the authors' constraint template,
"Satisfied: 1. ..., 2. ..." and "Unmet: ..." on one line each) and `goals`
(hindsight_goals.j2: the request restated with the items the draft missed as
requirements, no draft). Any other value is a path to a user's Jinja template, which
receives the variables documented in hindsight.j2.

What is shown is a choice of its own (measured per model by benchmarks/hindsight_effect.py):
the draft or not (hindsight.show_draft), every item with its verdict or only those to
fix (hindsight.show_items), and the grader's own detail ("412 words", "missing ['dog']";
hindsight.show_details).

A pitfall (negative weight) that is met is a mistake the draft made: it is listed with
what to fix, never with what to keep; an avoided pitfall is something to keep avoiding
(herl: "Mistakes the draft makes (remove them)" / "Mistakes the draft avoids (keep
avoiding them)"; reference and goals: the constraint "Avoid: <mistake>").

The instruction is the whole conversation: a single message as its text, several (a
multi-turn prompt, whose later turns refer to earlier answers) each under its role.
"""

from __future__ import annotations

from pathlib import Path

from herl.grading.checks import MET, UNKNOWN
from herl.util.templating import template, template_file

SHIPPED = {"herl": "hindsight.j2", "reference": "hindsight_reference.j2", "goals": "hindsight_goals.j2"}


def item_status(weight: float, verdict: str) -> str:
    """met / unmet / unknown for ordinary items; committed / avoided for pitfalls."""
    if weight < 0 and verdict != UNKNOWN:
        return "committed" if verdict == MET else "avoided"
    return verdict


def build_hindsight_prompt(messages: list[dict], rubric: list[dict], verdicts: list[str], draft: str,
                           show_weights: bool = True, naive: bool = False, wording: str = "herl",
                           show_draft: bool = True, show_items: str = "all",
                           details: list[str] | None = None) -> str:
    """The text of the hindsight prompt for one draft; `naive` lists the rubric without
    the verdicts (the NaiveHE ablation); `wording` is hindsight.template; `show_draft`,
    `show_items` (all / unmet) and `details` (the grader's detail per item, shown when
    given) are hindsight.show_draft, show_items and show_details."""
    details = details or [""] * len(rubric)
    items = [{"index": i + 1, "description": it["description"], "weight": it["weight"],
              "status": item_status(it["weight"], v), "detail": d}
             for i, (it, v, d) in enumerate(zip(rubric, verdicts, details, strict=True))]
    groups = {s: [it for it in items if it["status"] == s] for s in ("met", "unmet", "unknown", "committed", "avoided")}
    if naive:  # rubric order, no status
        groups = {"met": items, "unmet": [], "unknown": [], "committed": [], "avoided": []}
    elif show_items == "unmet":  # only what is to fix: nothing the draft already got right
        groups["met"], groups["avoided"] = [], []
        items = [it for it in items if it["status"] not in ("met", "avoided")]
    instruction = conversation_text(messages)
    weighted = show_weights and any(it["weight"] != 1.0 for it in rubric)
    tmpl = template(SHIPPED[wording]) if wording in SHIPPED else template_file(Path(wording))
    return tmpl.render(instruction=instruction, items=items, show_weights=weighted,
                       draft=draft if show_draft else None, naive=naive, show_items=show_items,
                       **groups).strip()


def conversation_text(messages: list[dict]) -> str:
    """The prompt's conversation as text: one message as it is; several as "Role: text"
    blocks, assistant turns included (the reference decodes the whole chat prompt)."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def encode_prompt(tokenizer, text: str, chat_template: bool = True) -> tuple[str, list[int]]:
    """(text the model sees, its token ids): as a user turn under the chat template, or
    raw, as the reference renders its rewrite prompts (hindsight.chat_template = false)."""
    if chat_template:
        from herl.generation.engines import render_chat

        return render_chat(tokenizer, [{"role": "user", "content": text}])
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])
