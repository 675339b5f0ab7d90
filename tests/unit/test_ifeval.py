"""The 25 IFEval instructions with hand-written responses: passes, fails and boundaries
(exact counts, trailing whitespace, markdown, case inside words), strict and loose."""

from __future__ import annotations

import pytest

from herl.grading.ifeval import IFEVAL_IDS, count_sentences
from herl.grading.rubric import MET, UNMET, describe_item
from tests.helpers import item_verdict

verdict = item_verdict


M, U = MET, UNMET
CASES = [
    # (id, kwargs, response, strict, loose)
    ("punctuation:no_comma", {}, "No commas here.", M, M),
    ("punctuation:no_comma", {}, "One, two.", U, U),
    ("punctuation:no_comma", {}, "Sure, here it is:\nno commas here", U, M),  # loose drops the first line
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", M, M),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and ** empty", U, U),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**bold** and *it*", M, M),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one two three", M, M),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one two", U, U),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"}, "one-two three", U, U),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"}, "one two", M, M),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "Dr. Smith came. He left. Bye!", M, M),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "It cost 3.50 dollars. Fine.", M, M),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "One. Two.", U, U),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "a\n***\nb", M, M),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\na\n***\nb", M, M),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "a *** *** b", U, U),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First part.\n\nThen, more.", M, M),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First part.\n\nNow more.", U, U),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "One.\n\nThen two.\n\nThree.", U, M),  # loose drops the last line: two paragraphs left
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!", M, M),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Hi! Say hi.", U, U),
    ("combination:two_responses", {}, "A\n******\nB", M, M),
    ("combination:two_responses", {}, "A\n******\nA", U, U),
    ("combination:two_responses", {}, "A ****** ****** B", U, U),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [address]", M, M),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] only", U, U),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello\nP.S. bye", M, M),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello ps bye", U, U),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi\np.p.s. later", M, M),
    ("detectable_format:constrained_response", {}, "My answer is yes.", M, M),
    ("detectable_format:constrained_response", {}, "my answer is yes", U, U),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', M, M),
    ("detectable_format:json_format", {}, "{'a': 1}", U, U),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nfoo\nSECTION 2\nbar", M, M),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2}, "SECTION 1 only", U, U),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", M, M),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n- b\n* c", U, M),  # loose: 2 after a line drop
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n- b\n* c\n* d\n* e", U, U),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "**bold**\n* a", U, U),
    ("detectable_format:title", {}, "<<My Title>>\ntext", M, M),
    ("detectable_format:title", {}, "<< >> text", U, U),
    ("detectable_format:title", {}, "<<a\nb>>", U, U),
    ("keywords:existence", {"keywords": ["cat", "dog"]}, "A Cat and a DOG", M, M),
    ("keywords:existence", {"keywords": ["cat", "dog"]}, "Catalog and hotdog", M, M),  # substrings count, as in IFEval
    ("keywords:existence", {"keywords": ["cat", "dog"]}, "catalog only", U, U),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A catalog", M, M),  # whole words only
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A Cat.", U, U),
    ("keywords:frequency", {"keyword": "the", "frequency": 2, "relation": "at least"}, "The cat and the dog", M, M),
    ("keywords:frequency", {"keyword": "the", "frequency": 2, "relation": "at least"}, "There then", M, M),
    ("keywords:frequency", {"keyword": "the", "frequency": 2, "relation": "less than"}, "the end", M, M),
    ("keywords:frequency", {"keyword": "the", "frequency": 2, "relation": "less than"}, "the end, the start", U, U),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "at least"}, "Banana", M, M),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "at least"}, "Apple", U, U),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "less than"}, "AAA", U, U),
    ("language:response_language", {"language": "en"},
     "This is a plain English sentence about the weather in the city today.", M, M),
    ("language:response_language", {"language": "en"},
     "Ceci est une phrase en français sur le temps qu'il fait aujourd'hui.", U, U),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Thanks. Any other questions?  \n", M, M),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, '"Thanks. any other questions?"', M, M),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Yes", U, U),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions?\n---", U, M),
    ("startend:quotation", {}, '"hi"', M, M),
    ("startend:quotation", {}, ' "hi" \n', M, M),
    ("startend:quotation", {}, '"', U, U),
    ("startend:quotation", {}, '**"hi"**', U, M),  # loose strips markdown asterisks
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "I LOVE NYC", M, M),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "HELLO world", M, M),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "STATE-OF-THE-ART work", U, U),  # a hyphenated word counts once
    ("change_case:english_capital", {}, "THIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER IN THE CITY TODAY.", M, M),
    ("change_case:english_capital", {}, "This is an English sentence about the weather.", U, U),
    ("change_case:english_lowercase", {}, "this is an english sentence about the weather in the city today.", M, M),
    ("change_case:english_lowercase", {}, "This is an English sentence about the weather.", U, U),
]


@pytest.mark.parametrize("kind,kwargs,response,strict,loose", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_instruction(kind, kwargs, response, strict, loose):
    assert verdict(kind, response, **kwargs) == (strict, loose)


def test_every_id_has_cases_and_a_description():
    assert len(IFEVAL_IDS) == 25
    assert {c[0] for c in CASES} == set(IFEVAL_IDS)
    for kind in IFEVAL_IDS:
        kwargs = next(c[1] for c in CASES if c[0] == kind)
        text = describe_item(kind, kwargs)
        assert text and "{" not in text, kind
    assert describe_item("length_constraints:number_words", {"num_words": 300, "relation": "at least"}) == \
        "Answer with at least 300 words."


def test_empty_response_follows_nothing():
    assert verdict("punctuation:no_comma", "   \n") == (UNMET, UNMET)


def test_sentence_splitter_keeps_abbreviations_together():
    assert count_sentences("Mr. Smith met Dr. Jones at 3.30 p.m. in the U.S.A. They talked.") == 2
    assert count_sentences("Wait... what? Yes!") == 3
