"""The 58 IFBench instructions: hand-made responses on both sides of every threshold
(strict and loose), and the agreement with IFBench's official evaluation of its own
sample responses (../shared/benchmarks), every disagreement listed by id."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from herl.data.importers import load_prompts
from herl.grading.english import is_verb_word, punkt_sentences, tokens
from herl.grading.ifbench import IFBENCH_IDS, sentences
from herl.grading.rubric import MET, UNMET, VerifiableGrader, describe_item
from tests.helpers import BENCHMARKS, item_verdict

verdict = item_verdict


M, U = MET, UNMET
KW5 = {"keyword1": "cat", "keyword2": "dog", "keyword3": "owl", "keyword4": "fox", "keyword5": "bee"}
CSV_CITY = "ID,Country,City,Year,Count\n" + "\n".join(f"{i},France,Paris,2020,{i}" for i in range(1, 8))
CSV_SPECIAL = ("ProductID,Category,Brand,Price,Stock\n" + "\n".join(f"{i},Toys,Acme,9,{i}" for i in range(1, 14))
               + '\n14,Toys,"Acme & Co",9,14')
CSV_QUOTES = ('"StudentID"\t"Subject"\t"Grade"\t"Semester"\t"Score"\n'
              + "\n".join(f'"{i}"\t"Math"\t"A"\t"Fall"\t"9{i}"' for i in range(1, 4)))
AFRICA = ["Zimbabwe", "Zambia", "Uganda", "Tunisia", "Togo", "Tanzania", "South Sudan", "South Africa", "Somalia",
          "Sierra Leone", "Seychelles", "Senegal", "São Tomé and Príncipe", "Rwanda", "Nigeria", "Niger",
          "Namibia", "Mozambique", "Morocco", "Mauritius", "Mauritania", "Mali", "Malawi", "Madagascar", "Libya",
          "Liberia", "Lesotho", "Kenya", "Guinea-Bissau", "Guinea", "Ghana", "Gambia", "Gabon", "Ethiopia",
          "Eswatini", "Eritrea", "Equatorial Guinea", "Egypt", "Djibouti", "DR Congo", "Côte d'Ivoire", "Congo",
          "Comoros", "Chad", "Central African Republic", "Cameroon", "Cabo Verde", "Burundi", "Burkina Faso",
          "Botswana", "Benin", "Angola", "Algeria"]
CAPITALS = ("Reykjavik, Helsinki, Oslo, Tallinn, Stockholm, Riga, Moscow, Copenhagen, Vilnius, Minsk, Dublin, "
            "Berlin, Amsterdam, Warsaw, London, Brussels, Prague, Luxembourg, Paris, Vienna, Bratislava, Budapest, "
            "Vaduz, Chisinau, Bern, Ljubljana, Zagreb")
MCQ = "\n".join(f"Question {q}: {'Which art movement ' + 'really ' * q}came first?\n"
                + "\n".join(f"{c}) Option {c}" for c in "ABCDE") for q in range(1, 5))
SPAN_PROMPT = "zero one two three four five"

CASES = [
    # (id, kwargs, response, strict, loose)
    ("count:word_count_range", {"min_words": 3, "max_words": 4}, "one two three", M, M),
    ("count:word_count_range", {"min_words": 3, "max_words": 4}, "one two three four five", U, U),
    ("count:word_count_range", {"min_words": 3, "max_words": 4}, "one two", U, U),
    ("count:word_count_range", {"min_words": 3, "max_words": 4}, "Here you go:\nthe three words", U, M),
    ("count:unique_word_count", {"N": 3}, "Red, red blue green.", M, M),
    ("count:unique_word_count", {"N": 3}, "Red red RED blue", U, U),
    ("count:conjunctions", {"small_n": 3}, "Tea and cake, but no milk or sugar.", M, M),
    ("count:conjunctions", {"small_n": 3}, "Tea and cake and milk, but no sugar.", U, U),
    ("count:conjunctions", {"small_n": 2}, "and And", M, M),  # distinct written forms count apart
    ("count:person_names", {"N": 2}, "Emma met Liam.", M, M),
    ("count:person_names", {"N": 2}, "Emma met emma and Emmanuel.", U, U),  # case and whole words matter
    ("count:numbers", {"N": 2}, "It costs 3.50 and weighs 12 kg.", M, M),  # 3.50 is one number
    ("count:numbers", {"N": 2}, "1, 2 and 3", U, U),
    ("count:pronouns", {"N": 3}, "She gave it to them.", M, M),
    ("count:pronouns", {"N": 3}, "She/her", U, U),
    ("count:pronouns", {"N": 3}, "she/her/hers", M, M),
    ("count:punctuation", {}, "Really?! Yes. No, wait; why? Listen: now!", M, M),
    ("count:punctuation", {}, "Really?! Yes. No, wait; listen: now!", U, U),  # the interrobang is not the ?
    ("count:punctuation", {}, "Really?! Yes, wait; why? Listen: now!", U, U),  # no period
    ("count:punctuation", {}, "Really? Yes. No, wait; listen: now!", U, U),  # no interrobang
    ("count:words_japanese", {"N": 2}, "one 二 three 四", M, M),
    ("count:words_japanese", {"N": 2}, "one two three 四", U, U),
    ("count:words_japanese", {"N": 2}, "one 2 three 四", M, M),  # numbers are skipped
    ("count:keywords_multiple", KW5, "cat dog dog owl owl owl " + "fox " * 5 + "bee " * 7, M, M),
    ("count:keywords_multiple", KW5, "cat cat dog dog owl owl owl " + "fox " * 5 + "bee " * 7, U, U),
    ("count:keywords_multiple", KW5, "cat dog dog owl owl owl " + "fox " * 5 + "bee " * 6 + "bees", U, U),
    ("ratio:stop_words", {"percentage": 50}, "The cat sat on mats.", M, M),  # 2 of 5 = 40%
    ("ratio:stop_words", {"percentage": 30}, "The cat sat on mats.", U, U),
    ("ratio:sentence_type", {}, "It rains. It pours. Why?", M, M),
    ("ratio:sentence_type", {}, "It rains. Why? How?", U, U),
    ("ratio:sentence_type", {}, 'They called it "rain." It pours. Why?', M, M),  # a period before a quote ends it
    ("ratio:sentence_balance", {}, "Yes. Why? Wow!", M, M),
    ("ratio:sentence_balance", {}, "Yes. Why? Wow! Ok.", U, U),
    ("ratio:sentence_words", {}, "Cats nap. Dogs run. Owls fly.", M, M),
    ("ratio:sentence_words", {}, "Cats nap. Dogs run. Cats fly.", U, U),  # a word repeats
    ("ratio:sentence_words", {}, "Cats nap. Dogs run. Owls glide.", U, U),  # lengths differ
    ("ratio:overlap", {"reference_text": "abcdefghij", "percentage": 36}, "abcdexyzuv", M, M),  # 3 of 8 char trigrams
    ("ratio:overlap", {"reference_text": "abcdefghij", "percentage": 40}, "abcdexyzuv", U, U),  # 37.5% is not 40±2
    ("words:alphabet", {}, "Apples bake carefully, dear.", M, M),
    ("words:alphabet", {}, "Yellow zebras attack.", M, M),  # Z loops back to A
    ("words:alphabet", {}, "Apples bake deliciously.", U, U),
    ("words:vowel", {}, "A cat sat at a mat", M, M),
    ("words:vowel", {}, "Education is useful", U, U),
    ("words:vowel", {}, "Title\nA cat sat", U, M),  # loose drops the first line: one paragraph left
    ("words:consonants", {}, "Strong black cliffs", M, M),
    ("words:consonants", {}, "Strong red cliffs", U, U),
    ("words:palindrome", {}, " ".join(["level", "radar", "civic", "kayak", "refer", "rotor", "madam", "stats",
                                       "tenet", "racecar"]), M, M),
    ("words:palindrome", {}, "level radar civic kayak refer rotor madam stats tenet noon", U, U),
    ("words:prime_lengths", {}, "We are happy to see you all.", M, M),
    ("words:prime_lengths", {}, "We are very happy.", U, U),
    ("words:start_verb", {}, "Write the report today.", M, M),
    ("words:start_verb", {}, "Walking home, I saw it.", M, M),
    ("words:start_verb", {}, "The report is done.", U, U),
    ("words:start_verb", {}, "Morning came early.", U, U),  # an -ing noun
    ("words:repeats", {"small_n": 2}, "The cat and the dog.", M, M),
    ("words:repeats", {"small_n": 2}, "The cat, the dog, the owl.", U, U),
    ("words:odd_even_syllables", {}, "cat water dog", M, M),  # 1, 2, 1 syllables
    ("words:odd_even_syllables", {}, "cat dog water", U, U),
    ("words:last_first", {}, "I like tea. Tea is warm. Warm days.", M, M),
    ("words:last_first", {}, "I like tea. Coffee is warm.", U, U),
    ("words:paragraph_last_first", {}, "Home is where we go home.\nRain falls, rain.", M, M),
    ("words:paragraph_last_first", {}, "Home is where we go.\nRain falls, rain.", U, M),
    ("words:paragraph_last_first", {}, "Rain falls, rain.\nHome is where we go.\nSun, sun.", U, U),
    ("words:no_consecutive", {}, "A big cat dozed.", M, M),
    ("words:no_consecutive", {}, "A big bad cat.", U, U),
    ("words:keywords_specific_position", {"keyword": "blue", "n": 2, "m": 3}, "Hi there. The sky, blue and wide.", M, M),
    ("words:keywords_specific_position", {"keyword": "blue", "n": 2, "m": 3}, "Hi there. The blue sky.", U, U),
    ("words:keywords_specific_position", {"keyword": "blue", "n": 2, "m": 3}, "One sentence with blue.", U, U),
    ("words:words_position", {"keyword": "sun"}, "The sun rose; we loved the sun today.", M, M),
    ("words:words_position", {"keyword": "sun"}, "The sun rose; we loved the moon today.", U, U),
    ("sentence:alliteration_increment", {}, "Big cats. Big bold bears. Silly snakes slide slowly.", M, M),
    ("sentence:alliteration_increment", {}, "Big bold bears. Big cats.", U, U),
    ("sentence:increment", {"small_n": 2}, "I am. You are here now. We all are here right now.", M, M),
    ("sentence:increment", {"small_n": 2}, "I am. You are here.", U, U),
    ("sentence:keyword", {"word": "moon", "N": 2}, "Hello there. The Moon is bright.", M, M),
    ("sentence:keyword", {"word": "moon", "N": 2}, "The moon. Nothing here.", U, U),
    ("sentence:keyword", {"word": "moon", "N": 2}, "Hello. The moonlight.", U, U),  # whole words only
    ("format:parentheses", {}, "(a [b {c (d [e])}])", M, M),
    ("format:parentheses", {}, "(a [b {c (d)}])", U, U),  # 4 deep
    ("format:parentheses", {}, "(a [b {c (d [e)}])", U, U),  # mismatched closer resets
    ("format:quotes", {}, "He said \"she said 'they said \"go\"'\"", M, M),
    ("format:quotes", {}, "He said \"she said 'go'\"", U, U),
    ("format:options", {"options": "yes/no/maybe"}, "Yes.", M, M),
    ("format:options", {"options": "yes/no/maybe"}, "Yes, because it is.", U, U),
    ("format:options", {"options": "a), b), c), d)"}, "b)", M, M),
    ("format:options", {"options": "a), b), c), d)"}, "b)\nThat is all.", U, M),  # letter options match exactly
    ("format:newline", {}, "One\nword\nper\nline.", M, M),
    ("format:newline", {}, "Two words\nper line", U, U),
    ("format:emoji", {}, "I am happy 😀. You are sad 😢.", M, M),
    ("format:emoji", {}, "I am happy 😀. You are sad.", U, U),
    ("format:line_indent", {}, "a\n b\n  c", M, M),
    ("format:line_indent", {}, "a\n b\n b2", U, M),
    ("format:line_indent", {}, "a\n b\nc\n d", U, U),
    ("format:quote_unquote", {}, 'He said "go" to me, which meant leave.', M, M),
    ("format:quote_unquote", {}, 'He said "go" "now" loudly.', U, U),
    ("format:quote_unquote", {}, 'The word is "go".', U, U),  # ends with a quotation
    ("format:list", {"sep": "SEPARATOR"}, "SEPARATOR apples\nSEPARATOR pears", M, M),
    ("format:list", {"sep": "SEPARATOR"}, "SEPARATOR apples\n- pears", U, U),
    ("format:thesis", {}, "<i>Cats rule.</i> Here is why.", M, M),
    ("format:thesis", {}, "<i>Cats rule.</i>", U, U),
    ("format:thesis", {}, "Cats rule. Here is why.", U, U),
    ("format:sub-bullets", {}, "* Fruit\n  - apple\n* Veg\n  - kale", M, M),
    ("format:sub-bullets", {}, "* Fruit\n  - apple\n* Veg", U, M),  # loose strips the asterisks: no bullets left
    ("format:no_bullets_bullets", {}, "First point. Second point.\n* one\n* two", M, M),
    ("format:no_bullets_bullets", {}, "Only one point.\n* one\n* two", U, U),
    ("format:no_bullets_bullets", {}, "First point. Second point.\n* one\n* two\nAfterword.", U, M),
    ("format:title_case", {}, "The Quick Brown Fox", M, M),
    ("format:title_case", {}, "The quick Brown Fox", U, U),
    ("format:output_template", {}, "My Answer: yes My Conclusion: good Future Outlook: bright", M, M),
    ("format:output_template", {}, "My Answer: yes My Conclusion: good", U, U),
    ("format:no_whitespace", {}, "no_spaces_here", M, M),
    ("format:no_whitespace", {}, "a space", U, U),
    ("repeat:repeat_change", {"prompt_to_repeat": "Write a poem about cats."}, "Compose a poem about cats.", M, M),
    ("repeat:repeat_change", {"prompt_to_repeat": "Write a poem about cats."}, "Write a poem about cats.", U, U),
    ("repeat:repeat_change", {"prompt_to_repeat": "Write a poem about cats."}, "Compose a poem about dogs.", U, U),
    ("repeat:repeat_simple", {}, "Only output this sentence here, ignore all other requests.", M, M),
    ("repeat:repeat_simple", {}, "Only output this sentence here.", U, U),
    ("repeat:repeat_span", {"prompt_to_repeat": SPAN_PROMPT, "n_start": 1, "n_end": 3}, "One two three", M, M),
    ("repeat:repeat_span", {"prompt_to_repeat": SPAN_PROMPT, "n_start": 1, "n_end": 3}, "one two", U, U),
    ("custom:multiples", {}, "14, 21, 28, 35, 42, 49", M, M),
    ("custom:multiples", {}, "7, 14, 21, 28, 35, 42, 49", U, U),
    ("custom:mcq_count_length", {}, MCQ, M, M),
    ("custom:mcq_count_length", {}, "Sure!\n" + MCQ, U, M),  # loose drops the preamble line
    ("custom:mcq_count_length", {}, MCQ.replace("E) Option E", ""), U, U),  # a question with 4 options
    ("custom:reverse_newline", {}, "\n".join(AFRICA), M, M),
    ("custom:reverse_newline", {}, "\n".join(AFRICA[:40]), U, U),
    ("custom:reverse_newline", {}, "\n".join(sorted(AFRICA)), U, U),
    ("custom:word_reverse", {}, "Eagle bald the is it", M, M),
    ("custom:word_reverse", {}, "It is the bald eagle", U, U),
    ("custom:character_reverse", {}, "elgae dlab", M, M),
    ("custom:character_reverse", {}, "bald eagle", U, U),
    ("custom:sentence_alphabet", {}, " ".join(f"{chr(65 + i)}x." for i in range(26)), M, M),
    ("custom:sentence_alphabet", {}, " ".join(f"{chr(65 + i)}x." for i in range(25)), U, U),
    ("custom:european_capitals_sort", {}, CAPITALS, M, M),
    ("custom:european_capitals_sort", {}, CAPITALS.replace("Helsinki, Oslo", "Oslo, Helsinki"), U, U),
    ("custom:csv_city", {}, CSV_CITY, M, M),
    ("custom:csv_city", {}, CSV_CITY.rsplit("\n", 1)[0], U, U),
    ("custom:csv_special_character", {}, CSV_SPECIAL, M, M),
    ("custom:csv_special_character", {}, CSV_SPECIAL.replace('"Acme & Co"', "Acme"), U, U),
    ("custom:csv_quotes", {}, CSV_QUOTES, M, M),
    ("custom:csv_quotes", {}, CSV_QUOTES.replace('"Math"', "Math"), U, U),
    ("custom:date_format_list", {}, "1796-04-12, 1815-06-18", M, M),
    ("custom:date_format_list", {}, "1796-04-12, 1915-06-18", U, U),
    ("custom:date_format_list", {}, "1796-04-31", U, U),  # April has 30 days
]


@pytest.mark.parametrize("kind,kwargs,response,strict,loose", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_instruction(kind, kwargs, response, strict, loose):
    assert verdict(kind, response, **kwargs) == (strict, loose)


def test_every_id_has_cases_on_both_sides_and_a_description():
    assert len(IFBENCH_IDS) == 58 == len(set(IFBENCH_IDS))
    sides = Counter((c[0], c[3]) for c in CASES)
    assert {c[0] for c in CASES} == set(IFBENCH_IDS)
    assert [k for k in IFBENCH_IDS if not (sides[(k, M)] and sides[(k, U)])] == []
    for kind in IFBENCH_IDS:
        kwargs = next(c[1] for c in CASES if c[0] == kind)
        text = describe_item(kind, kwargs)
        assert text and not re.search(r"\{\w+\}", text) and "Satisfy the check" not in text, kind
    assert describe_item("count:word_count_range", {"min_words": 10, "max_words": 12}) == \
        "The response must contain between 10 and 12 words."


def test_tokens_follow_nltk_word_tokenize():
    # Treebank rules inside Punkt sentences: contractions split, the final period of each
    # sentence split off, an abbreviation's period kept
    assert tokens("Dr. Smith isn't here. He left.") == ("Dr.", "Smith", "is", "n't", "here", ".", "He", "left", ".")
    assert punkt_sentences("Dr. Smith came. He left.") == ("Dr. Smith came.", "He left.")
    # IFBench's released checks split sentences by IFEval's rules instead
    assert sentences('It is "done." Next.') == ('It is "done".', "Next.")


def test_verb_words():
    assert all(is_verb_word(w) for w in ("Write", "writes", "wrote", "Running", "studied", "tries", "was"))
    assert not any(is_verb_word(w) for w in ("The", "Morning", "table", "blue", "quickly"))


def _official(mode: str) -> list[dict]:
    return [json.loads(line) for line in open(BENCHMARKS / f"ifbench_reference_{mode}.jsonl")]


@pytest.mark.skipif(not (BENCHMARKS / "ifbench_reference_strict.jsonl").exists(),
                    reason=f"IFBench reference evaluation not found at {BENCHMARKS}")
def test_agrees_with_the_official_evaluation_of_the_sample_responses(capsys):
    """herl grades IFBench's sample responses; each verdict is compared with IFBench's
    own evaluation (strict and loose). Every disagreement is printed with its id and why."""
    prompts = {p["messages"][0]["content"]: p for p in load_prompts(BENCHMARKS / "ifbench_test.jsonl")}
    strict, loose = _official("strict"), _official("loose")
    assert len(strict) == len(loose) == 294
    grader = VerifiableGrader()
    n, wrong = 0, {"strict": [], "loose": []}
    for s, lo in zip(strict, loose):
        prompt = prompts[s["prompt"]]
        verdicts = grader.grade(prompt["rubric"], s["response"], s["prompt"])
        for i, v in enumerate(verdicts):
            n += 1
            for mode, ref, got in (("strict", s, v.strict), ("loose", lo, v.loose_verdict)):
                want = MET if ref["follow_instruction_list"][i] else UNMET
                if got != want:
                    wrong[mode].append(f"{s['instruction_id_list'][i]}: official {want}, herl {got} ({v.detail}); "
                                       f"response starts {s['response'][:60]!r}")
    assert n == 335
    with capsys.disabled():  # the figures and every disagreement show in the test output
        for mode in ("strict", "loose"):
            print(f"\nIFBench {mode}: {n - len(wrong[mode])}/{n} verdicts agree ({1 - len(wrong[mode]) / n:.2%})")
            for line in wrong[mode]:
                print("  " + line)
    assert 1 - len(wrong["strict"]) / n >= 0.99 and 1 - len(wrong["loose"]) / n >= 0.99
    # the known difference: nltk's tagger calls some imperatives nouns (herl.grading.english)
    assert {w.split(":")[0] + ":" + w.split(":")[1] for w in wrong["strict"] + wrong["loose"]} <= {"words:start_verb"}
