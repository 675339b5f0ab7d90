"""A reward written in Python, as TRL's `reward_funcs` are: a check herl's grader calls for
each (answer, rubric item) of kind `mentions`, with the item's `params` as keyword
arguments. It returns met / unmet (and a detail that `herl sql` shows); an answer's
reward is the weighted share of its items met (`grade.reward`), so a graded score is
several items. From the project folder:

    PYTHONPATH=examples herl run examples/python_reward.toml
    herl sql runs/python-reward "SELECT item_id, verdict, detail FROM verdicts WHERE prompt_id = 'fruit' LIMIT 8"

The config's `plugins = ["python_reward"]` imports this module when the run opens (and
in every process that grades); `herl grade --plugin python_reward` does the same.
"""

from __future__ import annotations

from herl.grading.checks import register_check


def _describe(words: list[str], at_least: int = 1) -> str:
    return f"Mention at least {at_least} of: {', '.join(words)}."


@register_check("mentions", describe=_describe)
def mentions(response: str, *, words: list[str], at_least: int = 1) -> tuple[bool, str]:
    """Met when the answer names at least `at_least` of `words` (case-insensitive)."""
    found = [w for w in words if w.lower() in response.lower()]
    return len(found) >= at_least, f"mentions {len(found)} of {len(words)}: {', '.join(found) or 'none'}"
