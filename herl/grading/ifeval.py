"""The 25 IFEval instruction checks, registered as rubric kinds named by their ids.

Semantics follow IFEval's reference checker (Zhou et al., 2023) kwarg for kwarg:
relations are "less than" (<) and "at least" (>=); keyword searches are
case-insensitive; an empty response follows nothing. Two parts of the reference need
data that cannot be downloaded here and are replaced by offline equivalents:
- sentence counting uses nltk's punkt model there; here a rule-based splitter (the
  same abbreviation, acronym, decimal and website rules IFEval uses to split sentences
  elsewhere);
- capital-word counting uses nltk's word_tokenize there; here a regex tokenizer that
  keeps hyphenated words and contractions whole.
Language checks use `langdetect` with a fixed seed, as the reference does.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache

from herl.grading.checks import register_check

LANGUAGES = {
    "en": "English", "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi", "fr": "French",
    "ru": "Russian", "de": "German", "ja": "Japanese", "it": "Italian", "bn": "Bengali", "uk": "Ukrainian",
    "th": "Thai", "ur": "Urdu", "ta": "Tamil", "te": "Telugu", "bg": "Bulgarian", "ko": "Korean",
    "pl": "Polish", "he": "Hebrew", "fa": "Persian", "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili",
    "kn": "Kannada", "mr": "Marathi", "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
}
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


IFEVAL_IDS: list[str] = []  # the instruction ids this module registers


def _ifeval(kind: str, describe):
    IFEVAL_IDS.append(kind)
    return register_check(kind, describe=describe)


def _compare(n: int, relation: str, threshold: int) -> bool:
    if relation == "less than":
        return n < threshold
    if relation == "at least":
        return n >= threshold
    raise ValueError(f"relation must be 'less than' or 'at least', got {relation!r}")


# ---- text utilities (offline) ------------------------------------------------------

_PERIOD, _STOP = "\x00", "\x01"  # placeholders: a period that ends nothing / a sentence end


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence splitting: titles (Mr.), initials, acronyms (U.S.A.),
    decimals (3.14), web suffixes (.com) and ellipses do not end a sentence."""
    t = " " + text.replace("\n", " ") + "  "
    t = re.sub(r"(Mr|St|Mrs|Ms|Dr)[.]", r"\1" + _PERIOD, t)
    t = re.sub(r"[.](com|net|org|io|gov|edu|me)", _PERIOD + r"\1", t)
    t = re.sub(r"([0-9])[.]([0-9])", r"\1" + _PERIOD + r"\2", t)
    t = re.sub(r"\.{2,}", lambda m: _PERIOD * len(m.group(0)) + _STOP, t)
    t = t.replace("Ph.D.", f"Ph{_PERIOD}D{_PERIOD}")
    t = re.sub(r"\s([A-Za-z])[.] ", r" \1" + _PERIOD + " ", t)
    starters = r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|That\s|This\s|Wherever)"
    t = re.sub(r"([A-Z][.][A-Z][.](?:[A-Z][.])?) " + starters, r"\1" + _STOP + r" \2", t)
    t = re.sub(r"([A-Za-z])[.]([A-Za-z])[.]([A-Za-z])[.]", rf"\1{_PERIOD}\2{_PERIOD}\3{_PERIOD}", t)
    t = re.sub(r"([A-Za-z])[.]([A-Za-z])[.]", rf"\1{_PERIOD}\2{_PERIOD}", t)
    t = re.sub(r" (Inc|Ltd|Jr|Sr|Co)[.] " + starters, r" \1" + _STOP + r" \2", t)
    t = re.sub(r" (Inc|Ltd|Jr|Sr|Co)[.]", r" \1" + _PERIOD, t)
    t = re.sub(r" ([A-Za-z])[.]", r" \1" + _PERIOD, t)
    # a closing quote belongs to its sentence (IFEval moves a curly one past a period only)
    t = t.replace(".\u201d", "\u201d.")
    for mark in (".", "!", "?"):
        t = t.replace(mark + '"', '"' + mark)
    for mark in (".", "?", "!"):
        t = t.replace(mark, mark + _STOP)
    parts = [s.replace(_PERIOD, ".").strip() for s in t.split(_STOP)]
    if parts and not parts[-1]:
        parts = parts[:-1]
    return parts


def count_sentences(text: str) -> int:
    return len([s for s in split_sentences(text) if s])


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def word_tokens(text: str) -> list[str]:
    """Words (hyphenated and with apostrophes kept whole), numbers and punctuation marks."""
    return re.findall(r"\w+(?:[-'\u2019]\w+)*|[^\w\s]", text)


@lru_cache(maxsize=4096)  # loose grading asks again for identical variants of a response
def detect_language(text: str) -> str | None:
    import langdetect

    langdetect.DetectorFactory.seed = 0
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None  # the reference counts an undetectable language as followed


# ---- the 25 instructions -----------------------------------------------------------


@_ifeval("punctuation:no_comma",
                describe=lambda: "In your entire response, refrain from the use of any commas.")
def no_comma(response: str) -> bool:
    return "," not in response


@_ifeval("detectable_format:number_highlighted_sections",
                describe=lambda num_highlights: f"Highlight at least {num_highlights} sections in your answer with markdown, i.e. *highlighted section*.")
def highlighted_sections(response: str, *, num_highlights: int) -> tuple[bool, str]:
    singles = [h for h in re.findall(r"\*[^\n*]*\*", response) if h.strip("*").strip()]
    doubles = [h for h in re.findall(r"\*\*[^\n*]*\*\*", response) if h[2:-2].strip()]
    n = len(singles) + len(doubles)
    return n >= num_highlights, f"{n} highlighted sections"


@_ifeval("length_constraints:number_words",
                describe=lambda num_words, relation: f"Answer with {relation} {num_words} words.")
def number_words(response: str, *, num_words: int, relation: str) -> tuple[bool, str]:
    n = count_words(response)
    return _compare(n, relation, num_words), f"{n} words"


@_ifeval("length_constraints:number_sentences",
                describe=lambda num_sentences, relation: f"Your response should contain {relation} {num_sentences} sentences.")
def number_sentences(response: str, *, num_sentences: int, relation: str) -> tuple[bool, str]:
    n = count_sentences(response)
    return _compare(n, relation, num_sentences), f"{n} sentences"


@_ifeval("length_constraints:number_paragraphs",
                describe=lambda num_paragraphs: f"There should be {num_paragraphs} paragraphs. Paragraphs are separated with the markdown divider: ***")
def number_paragraphs(response: str, *, num_paragraphs: int) -> tuple[bool, str]:
    parts = re.split(r"\s?\*\*\*\s?", response)
    n = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i in (0, len(parts) - 1):
                n -= 1
            else:
                return False, "an empty paragraph between dividers"
    return n == num_paragraphs, f"{n} paragraphs"


@_ifeval("length_constraints:nth_paragraph_first_word",
                describe=lambda num_paragraphs, nth_paragraph, first_word: (
                    f"There should be {num_paragraphs} paragraphs, separated by two new lines. "
                    f"Paragraph {nth_paragraph} must start with the word {first_word}."))
def nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> tuple[bool, str]:
    paragraphs = response.split("\n\n")
    n = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > n:
        return False, f"{n} paragraphs"
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False, f"paragraph {nth_paragraph} is empty"
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    got = ""
    for ch in word:
        if ch in {".", ",", "?", "!", "'", '"'}:
            break
        got += ch.lower()
    return n == num_paragraphs and got == first_word.lower(), f"{n} paragraphs, paragraph {nth_paragraph} starts with {got!r}"


@_ifeval("combination:repeat_prompt",
                describe=lambda prompt_to_repeat: "First repeat the request word for word without change, then give your answer.")
def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


@_ifeval("combination:two_responses",
                describe=lambda: "Give two different responses, separated by 6 asterisk symbols: ******.")
def two_responses(response: str) -> bool:
    parts = response.split("******")
    valid = []
    for i, part in enumerate(parts):
        if not part.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


@_ifeval("detectable_content:number_placeholders",
                describe=lambda num_placeholders: f"The response must contain at least {num_placeholders} placeholders in square brackets, such as [address].")
def number_placeholders(response: str, *, num_placeholders: int) -> tuple[bool, str]:
    n = len(re.findall(r"\[.*?\]", response))
    return n >= num_placeholders, f"{n} placeholders"


@_ifeval("detectable_content:postscript",
                describe=lambda postscript_marker: f"At the end of your response, add a postscript starting with {postscript_marker}")
def postscript(response: str, *, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


@_ifeval("detectable_format:constrained_response",
                describe=lambda: "Answer with one of the following options: " + ", ".join(repr(o) for o in CONSTRAINED_OPTIONS))
def constrained_response(response: str) -> bool:
    text = response.strip()
    return any(option in text for option in CONSTRAINED_OPTIONS)


@_ifeval("detectable_format:json_format",
                describe=lambda: "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.")
def json_format(response: str) -> bool:
    text = response.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@_ifeval("detectable_format:multiple_sections",
                describe=lambda section_spliter, num_sections: f"Your response must have {num_sections} sections. Mark the beginning of each section with {section_spliter} X.")
def multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> tuple[bool, str]:
    n = len(re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", response)) - 1
    return n >= num_sections, f"{n} sections"


@_ifeval("detectable_format:number_bullet_lists",
                describe=lambda num_bullets: f"Your answer must contain exactly {num_bullets} bullet points, using markdown bullets such as * This is a point.")
def number_bullet_lists(response: str, *, num_bullets: int) -> tuple[bool, str]:
    stars = re.findall(r"^\s*\*[^*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    n = len(stars) + len(dashes)
    return n == num_bullets, f"{n} bullet points"


@_ifeval("detectable_format:title",
                describe=lambda: "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.")
def title(response: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


@_ifeval("keywords:existence",
                describe=lambda keywords: f"Include the keywords {', '.join(keywords)} in the response.")
def keywords_existence(response: str, *, keywords: list[str]) -> tuple[bool, str]:
    missing = [k for k in keywords if not re.search(re.escape(k), response, flags=re.IGNORECASE)]
    return not missing, f"missing {missing}" if missing else ""


@_ifeval("keywords:forbidden_words",
                describe=lambda forbidden_words: f"Do not include the keywords {', '.join(forbidden_words)} in the response.")
def forbidden_words(response: str, *, forbidden_words: list[str]) -> tuple[bool, str]:
    used = [w for w in forbidden_words if re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE)]
    return not used, f"used {used}" if used else ""


@_ifeval("keywords:frequency",
                describe=lambda keyword, frequency, relation: f"In your response, the word {keyword} should appear {relation} {frequency} times.")
def keyword_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> tuple[bool, str]:
    n = len(re.findall(re.escape(keyword.strip()), response, flags=re.IGNORECASE))
    return _compare(n, relation, frequency), f"{n} times"


@_ifeval("keywords:letter_frequency",
                describe=lambda letter, let_frequency, let_relation: f"In your response, the letter {letter} should appear {let_relation} {let_frequency} times.")
def letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> tuple[bool, str]:
    n = Counter(response.lower())[letter.strip().lower()]
    return _compare(n, let_relation, let_frequency), f"{n} times"


@_ifeval("language:response_language",
                describe=lambda language: f"Your ENTIRE response should be in {LANGUAGES.get(language, language)} language, no other language is allowed.")
def response_language(response: str, *, language: str) -> tuple[bool, str]:
    got = detect_language(response)
    return got is None or got == language, f"detected {got}"


@_ifeval("startend:end_checker",
                describe=lambda end_phrase: f"Finish your response with this exact phrase {end_phrase}. No other words should follow this phrase.")
def end_checker(response: str, *, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@_ifeval("startend:quotation", describe=lambda: "Wrap your entire response with double quotation marks.")
def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


@_ifeval("change_case:capital_word_frequency",
                describe=lambda capital_frequency, capital_relation: f"In your response, words with all capital letters should appear {capital_relation} {capital_frequency} times.")
def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> tuple[bool, str]:
    n = sum(1 for w in word_tokens(response) if w.isupper())
    return _compare(n, capital_relation, capital_frequency), f"{n} capital words"


@_ifeval("change_case:english_capital",
                describe=lambda: "Your entire response should be in English, and in all capital letters.")
def english_capital(response: str) -> tuple[bool, str]:
    if not response.isupper():  # the cheap test first, as the reference does
        return False, "not all capital letters"
    got = detect_language(response)
    return got in (None, "en"), f"detected {got}"


@_ifeval("change_case:english_lowercase",
                describe=lambda: "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.")
def english_lowercase(response: str) -> tuple[bool, str]:
    if not response.islower():
        return False, "not all lowercase letters"
    got = detect_language(response)
    return got in (None, "en"), f"detected {got}"


