"""`builtin:ifgen`: instruction-following prompts with verifiable constraints, generated.

The shape of the paper's training data (HIR-16K): a natural request plus 1-3 constraints
that the prompt states and the rubric checks, drawn from herl's IFEval checks with
sampled arguments and the checks' own descriptions. Requests are written for this pool
(kinds IFEval asks for: letters, stories, explanations, lists, summaries, ads, poems)
and combined with subjects; none is an IFEval prompt (tests/unit/test_ifgen.py checks that
the pool shares no request with IFEval's 541), so IFEval stays a held-out evaluation.

    pool = builtin_ifgen(num_prompts=500, seed=0)
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from herl.grading.rubric import describe_item

# request templates: {s} is a subject
REQUESTS = [
    "Write a short story about {s}.",
    "Write to your cousin describing what you recently learned about {s}.",
    "Explain {s} to a ten-year-old.",
    "Give advice to someone who wants to learn about {s}.",
    "Describe a board game whose theme is {s}.",
    "Write a short poem about {s}.",
    "Summarize why people find {s} interesting.",
    "Write a blog post introduction about {s}.",
    "Describe a typical day for someone whose job involves {s}.",
    "Write an advertisement for a weekend workshop on {s}.",
    "What are the good and bad sides of {s}?",
    "Write a short speech for a school assembly about {s}.",
]
SUBJECTS = [
    "beekeeping", "city gardens", "old trains", "the night sky", "bread baking", "rainy weather",
    "learning a second language", "a lighthouse keeper", "mountain hiking", "recycling at home",
    "street markets", "chess", "public libraries", "a river journey", "winter sports",
    "homemade soup", "paper airplanes", "owls", "the first day at a new job", "a family picnic",
    "bicycle repair", "tide pools", "jazz music", "a lost umbrella", "volcanoes", "sourdough",
    "a village festival", "kites", "penguins", "fixing a leaky tap",
]

WORDS = ["river", "lantern", "garden", "window", "music", "travel", "morning", "friend", "winter", "paper"]
PS = ["P.S.", "P.P.S"]
END = ["Is there anything else I can help with?", "Let me know if you have additional questions.",
       "Thank you for reading."]
SPLIT = ["Section", "SECTION", "Part"]


def _kwargs(kind: str, rng: random.Random) -> dict | None:
    """Sampled arguments of an IFEval check (None: the check is not used in this pool)."""
    rel = lambda: rng.choice(["less than", "at least"])  # noqa: E731
    samplers: dict[str, Callable[[], dict]] = {
        "punctuation:no_comma": lambda: {},
        "detectable_format:number_highlighted_sections": lambda: {"num_highlights": rng.randint(1, 3)},
        "length_constraints:number_words": lambda: {"num_words": rng.choice([50, 80, 120, 200]), "relation": rel()},
        "length_constraints:number_sentences": lambda: {"num_sentences": rng.randint(2, 8), "relation": rel()},
        "length_constraints:number_paragraphs": lambda: {"num_paragraphs": rng.randint(2, 4)},
        "detectable_content:number_placeholders": lambda: {"num_placeholders": rng.randint(1, 3)},
        "detectable_content:postscript": lambda: {"postscript_marker": rng.choice(PS)},
        "detectable_format:json_format": lambda: {},
        "detectable_format:multiple_sections": lambda: {"section_spliter": rng.choice(SPLIT),
                                                        "num_sections": rng.randint(2, 4)},
        "detectable_format:number_bullet_lists": lambda: {"num_bullets": rng.randint(2, 5)},
        "detectable_format:title": lambda: {},
        "keywords:existence": lambda: {"keywords": rng.sample(WORDS, 2)},
        "keywords:forbidden_words": lambda: {"forbidden_words": rng.sample(WORDS, 2)},
        "keywords:frequency": lambda: {"keyword": rng.choice(WORDS), "frequency": rng.randint(1, 3), "relation": rel()},
        "keywords:letter_frequency": lambda: {"letter": rng.choice("aeiost"), "let_frequency": rng.randint(3, 8),
                                              "let_relation": rel()},
        "startend:end_checker": lambda: {"end_phrase": rng.choice(END)},
        "startend:quotation": lambda: {},
        "change_case:english_capital": lambda: {},
        "change_case:english_lowercase": lambda: {},
        "change_case:capital_word_frequency": lambda: {"capital_frequency": rng.randint(1, 4),
                                                       "capital_relation": rel()},
        "combination:two_responses": lambda: {},
    }
    return samplers[kind]() if kind in samplers else None


KINDS = sorted(k for k in [
    "punctuation:no_comma", "detectable_format:number_highlighted_sections", "length_constraints:number_words",
    "length_constraints:number_sentences", "length_constraints:number_paragraphs",
    "detectable_content:number_placeholders", "detectable_content:postscript", "detectable_format:json_format",
    "detectable_format:multiple_sections", "detectable_format:number_bullet_lists", "detectable_format:title",
    "keywords:existence", "keywords:forbidden_words", "keywords:frequency", "keywords:letter_frequency",
    "startend:end_checker", "startend:quotation", "change_case:english_capital", "change_case:english_lowercase",
    "change_case:capital_word_frequency", "combination:two_responses",
])
# pairs that cannot both hold, or make each other trivial
CONFLICTS = [{"change_case:english_capital", "change_case:english_lowercase"},
             {"change_case:english_lowercase", "change_case:capital_word_frequency"},
             {"detectable_format:json_format", "detectable_format:title"},
             {"detectable_format:json_format", "startend:quotation"},
             {"detectable_format:json_format", "detectable_content:postscript"},
             {"detectable_format:json_format", "startend:end_checker"},
             {"detectable_content:postscript", "startend:end_checker"},
             {"startend:quotation", "startend:end_checker"},
             {"startend:quotation", "detectable_content:postscript"},
             {"combination:two_responses", "detectable_format:json_format"}]


def base_requests() -> list[str]:
    """The pool's requests before constraints: every template with every subject (360)."""
    return [t.format(s=s) for t in REQUESTS for s in SUBJECTS]


def builtin_ifgen(num_prompts: int, seed: int) -> list[dict]:
    """`num_prompts` prompts (seeded), each a request with 1-3 stated, checked constraints."""
    import herl.grading.ifeval  # noqa: F401  registers the checks

    rng = random.Random(f"ifgen:{seed}")
    requests = base_requests()
    rows = []
    for i in range(num_prompts):
        request = requests[rng.randrange(len(requests))]
        target = rng.choice([1, 2, 2, 3])  # constraints on this prompt
        chosen: list[str] = []
        for kind in rng.sample(KINDS, len(KINDS)):
            if len(chosen) == target:
                break
            if not any({kind, c} in CONFLICTS for c in chosen):
                chosen.append(kind)
        items: list[dict] = []
        for kind in chosen:
            params = _kwargs(kind, rng) or {}
            items.append({"item_id": kind, "description": describe_item(kind, params), "weight": 1.0,
                          "kind": kind, "params": json.dumps(params, sort_keys=True)})
        text = request + " " + " ".join(it["description"] for it in items)
        rows.append({"prompt_id": f"ifgen-{i:05d}", "messages": [{"role": "user", "content": text}],
                     "rubric": items, "source": "builtin:ifgen"})
    return rows
