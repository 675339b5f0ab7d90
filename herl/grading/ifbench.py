"""The 58 IFBench instruction checks (Pyatkin et al., 2025), registered as rubric kinds
named by their ids (`count:word_count_range`, `words:start_verb`, ...).

Semantics follow IFBench's reference checker (allenai/IFBench, `instructions.py` and
`instructions_util.py`) kwarg for kwarg, its quirks included, so that herl's accuracies
are IFBench's; where the reference does something surprising, a comment says so. herl
follows the checker as released, the one that scored the paper's models and IFBench's
own sample responses; upstream has since changed two things, and herl keeps the released
behaviour (the sample's official evaluation disagrees with the newer code, not with it):
- sentences are split by IFEval's rules (herl.grading.ifeval.split_sentences; a period before a
  closing quote ends the sentence), not by nltk's Punkt;
- `ratio:overlap` compares character trigrams of the raw texts (the released checker
  hands strings to nltk.ngrams), not word trigrams.
Word tokens, stop words and verbs come from herl.grading.english, which documents where they can
differ from the reference's nltk data (`words:start_verb` can). An empty response follows
nothing (the evaluator never asks the check); loose verdicts come from herl.grading.rubric's
variants, as for IFEval.
"""

from __future__ import annotations

import csv
import io
import re
import string
import unicodedata
from collections import Counter
from functools import lru_cache

from herl.grading.checks import register_check
from herl.grading.english import (
    PUNCTUATION,
    alnum_tokens,
    bare_words,
    count_stop_words,
    starts_with_verb,
    strip_punctuation,
    tokens,
)

# words are runs of \w, as nltk's RegexpTokenizer(r"\w+") counts them: IFEval's count
from herl.grading.ifeval import count_words, split_sentences

IFBENCH_IDS: list[str] = []  # the instruction ids this module registers


@lru_cache(maxsize=8192)  # loose grading asks again for the same variants of a response
def sentences(text: str) -> tuple[str, ...]:
    """Sentences by IFEval's rules, as IFBench's released instructions_util splits them."""
    return tuple(split_sentences(text))


def _ifbench(kind: str, describe):
    IFBENCH_IDS.append(kind)
    return register_check(kind, describe=describe)


def _fixed(text: str):
    """The description of an instruction without parameters."""
    return lambda: text


def _strip(word: str) -> str:
    return word.strip(PUNCTUATION + " ")


def _ascii_fold(text: str) -> str:
    """'São Tomé' -> 'Sao Tome': decompose, then drop what is not ASCII."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _word_pattern(word: str) -> re.Pattern:
    return re.compile(r"\b" + re.escape(word) + r"\b", re.IGNORECASE)


# ---- count: ------------------------------------------------------------------------


@_ifbench("count:word_count_range",
          describe=lambda min_words, max_words: f"The response must contain between {min_words} and {max_words} words.")
def word_count_range(response: str, *, min_words: int, max_words: int) -> tuple[bool, str]:
    n = count_words(response)
    return min_words <= n <= max_words, f"{n} words"


@_ifbench("count:unique_word_count", describe=lambda N: f"Use at least {N} unique words in the response.")
def unique_word_count(response: str, *, N: int) -> tuple[bool, str]:
    n = len({_strip(w) for w in response.lower().split()})  # '' counts once, as in the reference
    return n >= N, f"{n} unique words"


CONJUNCTIONS = frozenset({"and", "but", "for", "nor", "or", "so", "yet"})


@_ifbench("count:conjunctions",
          describe=lambda small_n: f"Use at least {small_n} different coordinating conjunctions in the response.")
def conjunctions(response: str, *, small_n: int) -> tuple[bool, str]:
    # the reference counts distinct written forms: "and", "And" and "and," are three
    used = {w for w in response.split() if _strip(w).lower() in CONJUNCTIONS}
    return len(used) >= small_n, f"{len(used)} distinct conjunction forms"


PERSON_NAMES = (
    "Emma", "Liam", "Sophia", "Jackson", "Olivia", "Noah", "Ava", "Lucas", "Isabella", "Mason", "Mia", "Ethan",
    "Charlotte", "Alexander", "Amelia", "Benjamin", "Harper", "Leo", "Zoe", "Daniel", "Chloe", "Samuel", "Lily",
    "Matthew", "Grace", "Owen", "Abigail", "Gabriel", "Ella", "Jacob", "Scarlett", "Nathan", "Victoria", "Elijah",
    "Layla", "Nicholas", "Audrey", "David", "Hannah", "Christopher", "Penelope", "Thomas", "Nora", "Andrew", "Aria",
    "Joseph", "Claire", "Ryan", "Stella", "Jonathan",
)


@_ifbench("count:person_names",
          describe=lambda N: (f"Mention at least {N} different person names in the response, from this list of "
                              f"person names: {', '.join(PERSON_NAMES)} ."))
def person_names(response: str, *, N: int) -> tuple[bool, str]:
    found = [n for n in PERSON_NAMES if re.search(r"\b" + re.escape(n) + r"\b", response)]  # case-sensitive
    return len(found) >= N, f"{len(found)} names"


@_ifbench("count:numbers", describe=lambda N: f"Include exactly {N} numbers in the response.")
def numbers(response: str, *, N: int) -> tuple[bool, str]:
    n = len(re.findall(r"\d+", strip_punctuation(response)))  # "3.14" and "1,000" are one number each
    return n == N, f"{n} numbers"


PRONOUNS = frozenset("""
i me we us you he him she her it they them my mine our ours your yours his hers its their theirs myself
ourselves yourself yourselves himself herself itself themselves this that these those who whom whose which
what whoever whomever whatever whichever anybody anyone anything everybody everyone everything nobody
nothing somebody someone something each either neither both all some any none
""".split())


@_ifbench("count:pronouns", describe=lambda N: f"The response should include at least {N} pronouns.")
def pronouns(response: str, *, N: int) -> tuple[bool, str]:
    # "she/her/hers" counts three times
    n = sum(1 for t in tokens(response.replace("/", " ").lower()) if t in PRONOUNS)
    return n >= N, f"{n} pronouns"


@_ifbench("count:punctuation",
          describe=_fixed("Use every standard punctuation mark at least once, including semicolons, colons, "
                          "and the interrobang (?!)."))
def punctuation(response: str) -> tuple[bool, str]:
    if not ("!?" in response or "?!" in response or "\u203d" in response):
        return False, "no interrobang"
    rest = response.replace("?!", "", 1)  # the interrobang does not count as its own ? and !
    if len(rest) == len(response):
        rest = response.replace("!?", "", 1)
    missing = sorted(set(".,!?;:") - set(rest))
    return not missing, f"missing {''.join(missing)}" if missing else ""


@_ifbench("count:words_japanese", describe=lambda N: f"Every {N}th word of your response must be in Japanese.")
def words_japanese(response: str, *, N: int) -> tuple[bool, str]:
    for i, word in enumerate(response.split()):
        word = _strip(word)
        if (i + 1) % N == 0 and word and not word.isdigit() and not re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", word):
            return False, f"word {i + 1} {word!r} is not Japanese"
    return True, ""


@_ifbench("count:keywords_multiple",
          describe=lambda keyword1, keyword2, keyword3, keyword4, keyword5: (
              f"Include keyword {keyword1} once in your response, keyword {keyword2} twice in your response, "
              f"keyword {keyword3} three times in your response, keyword {keyword4} five times in your response, "
              f"and keyword {keyword5} seven times in your response."))
def keywords_multiple(response: str, *, keyword1: str, keyword2: str, keyword3: str, keyword4: str,
                      keyword5: str) -> tuple[bool, str]:
    wrong = []
    for keyword, want in zip((keyword1, keyword2, keyword3, keyword4, keyword5), (1, 2, 3, 5, 7)):
        got = len(_word_pattern(keyword.strip()).findall(response))
        if got != want:
            wrong.append(f"{keyword} {got}x (want {want})")
    return not wrong, "; ".join(wrong)


# ---- ratio: ------------------------------------------------------------------------


@_ifbench("ratio:stop_words",
          describe=lambda percentage: f"Ensure that stop words constitute no more than {percentage}% of the total words in your response.")
def stop_words(response: str, *, percentage: int) -> tuple[bool, str]:
    n = count_words(response)
    if n == 0:
        return False, "no words"
    share = 100 * count_stop_words(response) / n
    return share <= percentage, f"{share:.1f}% stop words"


def _endings(response: str) -> Counter:
    return Counter(s[-1] for s in sentences(response) if s)


@_ifbench("ratio:sentence_type", describe=_fixed("Maintain a 2:1 ratio of declarative to interrogative sentences."))
def sentence_type(response: str) -> tuple[bool, str]:
    c = _endings(response)
    return c["."] == 2 * c["?"], f"{c['.']} declarative, {c['?']} interrogative"


@_ifbench("ratio:sentence_balance",
          describe=_fixed("Ensure that the ratio of sentence types (declarative, interrogative, exclamatory) is balanced."))
def sentence_balance(response: str) -> tuple[bool, str]:
    c = _endings(response)
    return c["."] == c["?"] == c["!"], f"{c['.']} . / {c['?']} ? / {c['!']} !"


@_ifbench("ratio:sentence_words",
          describe=_fixed("Respond with three sentences, all containing the same number of characters but using all different words."))
def sentence_words(response: str) -> tuple[bool, str]:
    sents = sentences(response)
    if len(sents) != 3:
        return False, f"{len(sents)} sentences"
    lengths = {len(s.strip()) for s in sents}
    if len(lengths) != 1:
        return False, f"lengths {sorted(lengths)}"
    words = bare_words(" ".join(sents))
    return len(words) == len(set(words)), "a word repeats" if len(words) != len(set(words)) else ""


def _trigrams(text: str) -> set[str]:
    # character trigrams: IFBench's released checker passes the raw string to nltk.ngrams
    return {text[i:i + 3] for i in range(len(text) - 2)}


@_ifbench("ratio:overlap",
          describe=lambda percentage, reference_text=None: f"Maintain a trigram overlap of {percentage}% (±2%) with the provided reference text.")
def overlap(response: str, *, reference_text: str, percentage: int) -> tuple[bool, str]:
    grams = _trigrams(response)
    if not grams:
        return False, "no trigrams"
    share = 100 * len(grams & _trigrams(reference_text)) / len(grams)
    return percentage - 2 <= share <= percentage + 2, f"{share:.1f}% overlap"


# ---- words: ------------------------------------------------------------------------


@_ifbench("words:alphabet",
          describe=_fixed("Each word must start with the next letter of the alphabet, looping back to 'A' after 'Z'."))
def alphabet(response: str) -> tuple[bool, str]:
    words = _strip(strip_punctuation(response)).split()
    if not words:
        return False, "no words"
    letters = string.ascii_lowercase
    letter = words[0][0].lower()
    if letter not in letters:
        return False, f"starts with {letter!r}"
    for word in words[1:]:
        word = _strip(word).lower()
        if word:
            letter = letters[(letters.index(letter) + 1) % 26]
            if word[0] != letter:
                return False, f"{word!r} should start with {letter!r}"
    return True, ""


@_ifbench("words:vowel", describe=_fixed("Write a paragraph using words that contain only three types of vowels."))
def vowel(response: str) -> tuple[bool, str]:
    lines = response.strip().split("\n")
    if len(lines) != 1:
        return False, f"{len(lines)} lines"
    used = set(lines[0].lower()) & set("aeiou")
    return len(used) <= 3, f"vowels {''.join(sorted(used))}"


_CONSONANTS = frozenset("bcdfghjklmnpqrstvwxyz")


@_ifbench("words:consonants",
          describe=_fixed("Ensure each word in your response has at least one consonant cluster (two or more consonants together)."))
def consonants(response: str) -> tuple[bool, str]:
    for word in response.lower().split():
        if not any(a in _CONSONANTS and b in _CONSONANTS for a, b in zip(word, word[1:])):
            return False, f"{word!r} has no consonant cluster"
    return True, ""


@_ifbench("words:palindrome", describe=_fixed("Include at least 10 single-word palindromes, each at least 5 characters long."))
def palindrome(response: str) -> tuple[bool, str]:
    found = [w for w in strip_punctuation(response).lower().split() if len(w) >= 5 and w == w[::-1]]
    return len(found) >= 10, f"{len(found)} palindromes"


_PRIMES = frozenset({2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97})


@_ifbench("words:prime_lengths", describe=_fixed("Use only words with lengths that are prime numbers."))
def prime_lengths(response: str) -> tuple[bool, str]:
    bad = [w for w in strip_punctuation(response).split() if len(w) not in _PRIMES]
    return not bad, f"{bad[0]!r} has {len(bad[0])} letters" if bad else ""


@_ifbench("words:start_verb", describe=_fixed("The response must start with a verb."))
def start_verb(response: str) -> tuple[bool, str]:
    return starts_with_verb(response)


@_ifbench("words:repeats", describe=lambda small_n: f"The response should not repeat any word more than {small_n} times.")
def repeats(response: str, *, small_n: int) -> tuple[bool, str]:
    word, n = max(Counter(bare_words(response)).items(), key=lambda kv: kv[1], default=("", 0))
    return n <= small_n, f"{word!r} {n} times" if n else ""


@_ifbench("words:odd_even_syllables", describe=_fixed("Alternate between words with odd and even numbers of syllables."))
def odd_even_syllables(response: str) -> tuple[bool, str]:
    import syllapy  # the reference's syllable counter

    words = [w for w in strip_punctuation(response).lower().split() if w.strip()]
    parity = [syllapy.count(w) % 2 for w in words]
    for i in range(len(parity) - 1):
        if parity[i] == parity[i + 1]:
            return False, f"{words[i]!r} and {words[i + 1]!r} have syllable counts of the same parity"
    return True, ""


@_ifbench("words:last_first",
          describe=_fixed("The last word of each sentence must become the first word of the next sentence."))
def last_first(response: str) -> tuple[bool, str]:
    sents = sentences(response)
    for a, b in zip(sents, sents[1:]):
        last, first = a.rstrip(PUNCTUATION + " ").split(), b.lstrip(PUNCTUATION + " ").split()
        if not last or not first or last[-1].lower() != first[0].lower():
            return False, f"{(last or [''])[-1]!r} then {(first or [''])[0]!r}"
    return True, ""


@_ifbench("words:paragraph_last_first",
          describe=_fixed("Each paragraph must end with the same word it started with, separate paragraphs with a newline."))
def paragraph_last_first(response: str) -> tuple[bool, str]:
    for line in response.split("\n"):
        words = _strip(line.strip().lower()).split()
        if words and words[0] != words[-1]:  # inner punctuation stays: "end," is not "end"
            return False, f"starts {words[0]!r}, ends {words[-1]!r}"
    return True, ""


@_ifbench("words:no_consecutive", describe=_fixed("No two consecutive words can share the same first letter."))
def no_consecutive(response: str) -> tuple[bool, str]:
    words = bare_words(response)
    for a, b in zip(words, words[1:]):
        if a[0] == b[0]:
            return False, f"{a!r} {b!r}"
    return True, ""


@_ifbench("words:keywords_specific_position",
          describe=lambda keyword, n, m: f"Include keyword {keyword} in the {n}-th sentence, as the {m}-th word of that sentence.")
def keywords_specific_position(response: str, *, keyword: str, n: int, m: int) -> tuple[bool, str]:
    sents = sentences(response)
    if len(sents) < n:
        return False, f"{len(sents)} sentences"
    words = alnum_tokens(sents[n - 1])
    if len(words) < m:
        return False, f"sentence {n} has {len(words)} words"
    return words[m - 1].lower() == keyword.strip().lower(), f"word {m} of sentence {n} is {words[m - 1]!r}"


@_ifbench("words:words_position",
          describe=lambda keyword: f"The second word in your response and the second to last word in your response should be the word {keyword}.")
def words_position(response: str, *, keyword: str) -> tuple[bool, str]:
    words = alnum_tokens(response)
    if len(words) < 2:
        return False, f"{len(words)} words"
    return words[1].lower() == words[-2].lower() == keyword.strip().lower(), f"{words[1]!r} ... {words[-2]!r}"


# ---- sentence: ---------------------------------------------------------------------


@_ifbench("sentence:alliteration_increment",
          describe=_fixed("Each sentence must have a longer sequence of consecutive alliterative words than the previous one."))
def alliteration_increment(response: str) -> tuple[bool, str]:
    previous = -1
    for k, sent in enumerate(sentences(response)):
        words = [c for c in (w.lstrip(PUNCTUATION + " ") for w in sent.lower().split()) if c]
        # a run of n words sharing a first letter scores n; runs in one sentence add up
        score, in_run = 0, False
        for a, b in zip(words, words[1:]):
            if a[0] == b[0]:
                score += 1 if in_run else 2
                in_run = True
            else:
                in_run = False
        if score <= previous:
            return False, f"sentence {k + 1} scores {score}, the one before {previous}"
        previous = score
    return True, ""


@_ifbench("sentence:increment",
          describe=lambda small_n: f"Each sentence must contain exactly {small_n} more words than the previous one.")
def increment(response: str, *, small_n: int) -> tuple[bool, str]:
    counts = [len(strip_punctuation(s).split()) for s in sentences(response)]
    for k in range(1, len(counts)):
        if counts[k] != counts[k - 1] + small_n:
            return False, f"word counts {counts}"
    return True, ""


@_ifbench("sentence:keyword",
          describe=lambda word, N: f'The response must include keyword "{word}" in the {N}-th sentence.')
def sentence_keyword(response: str, *, word: str, N: int) -> tuple[bool, str]:
    sents = sentences(response)
    if len(sents) < N:
        return False, f"{len(sents)} sentences"
    return bool(_word_pattern(word).search(sents[int(N) - 1])), ""


# ---- format: -----------------------------------------------------------------------


@_ifbench("format:parentheses", describe=_fixed("Nest parentheses (and [brackets {and braces}]) at least 5 levels deep."))
def parentheses(response: str) -> tuple[bool, str]:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    deepest = 0
    for ch in response:
        if ch in "([{":
            stack.append(ch)
            deepest = max(deepest, len(stack))
        elif ch in pairs:
            if stack and stack[-1] == pairs[ch]:
                stack.pop()
                if deepest >= 5:  # a group 5 deep was opened and one of its levels closed
                    return True, ""
            else:  # a mismatched closer starts the count again
                stack, deepest = [], 0
    return False, f"deepest properly closed nesting below 5 (reached {deepest})"


@_ifbench("format:quotes",
          describe=_fixed("Include quotes within quotes within quotes, at least 3 levels deep, alternating between "
                          "double quotes and single quotes."))
def quotes(response: str) -> tuple[bool, str]:
    # apostrophes are quotes here too, as in the reference
    stack: list[str] = []
    reached = 0
    for ch in response:
        if stack and ch == stack[-1]:
            stack.pop()
            if reached - len(stack) >= 3:
                return True, ""
        elif ch in "\"'":
            stack.append(ch)
            reached = max(reached, len(stack))
    return False, f"reached {reached} levels"


def _options(options: str) -> tuple[list[str], bool]:
    """The allowed answers and whether they must match exactly (letter choices)."""
    exact = re.match(r"\W*[aA]\W*[bB]\W*[cC]\W*", options) is not None
    sep = "/" if "/" in options else "or" if "or" in options else ","  # "or" even inside a word
    return [o.strip() for o in options.split(sep)], exact


@_ifbench("format:options",
          describe=lambda options: f"Answer with one of the following options: {options}. Do not give any explanation.")
def options(response: str, *, options: str) -> tuple[bool, str]:
    allowed, exact = _options(options)
    if exact:
        return response in allowed, ""
    answer = _strip(response).lower()
    return any(_strip(o).lower() == answer for o in allowed), ""


@_ifbench("format:newline", describe=_fixed("Write each word on a new line."))
def newline(response: str) -> tuple[bool, str]:
    text = strip_punctuation(response).strip()
    lines = [line for line in text.split("\n") if line != ""]
    n_words = len(text.split())
    return len(lines) == n_words, f"{len(lines)} lines, {n_words} words"


@lru_cache(maxsize=1)
def _is_emoji():
    import emoji  # the reference's emoji table

    return emoji.is_emoji


@_ifbench("format:emoji", describe=_fixed("Please use an emoji at the end of every sentence."))
def emoji_end(response: str) -> tuple[bool, str]:
    is_emoji = _is_emoji()
    sents = sentences(response)
    for i, sent in enumerate(sents):
        bare = strip_punctuation(sent).strip()
        if not bare:
            return False, f"sentence {i + 1} is only punctuation"
        if is_emoji(bare[-1]) or is_emoji(bare[-2] if len(bare) > 1 else bare[-1]):
            continue
        # Punkt may put the emoji at the start of the next sentence
        following = strip_punctuation(sents[i + 1]).strip() if i < len(sents) - 1 else ""
        if not following or not is_emoji(following[0]):
            return False, f"sentence {i + 1} does not end with an emoji"
    return True, ""


@_ifbench("format:line_indent", describe=_fixed("Create stairs by incrementally indenting each new line."))
def line_indent(response: str) -> tuple[bool, str]:
    lines = response.split("\n")
    # The reference removes blank lines while iterating over the same list, which skips
    # the line after each blank one it removes; herl walks the list the same way.
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            lines.remove(lines[i])
        i += 1
    indents = [len(line) - len(line.lstrip(" ")) for line in lines]
    for k in range(len(indents) - 1):
        if indents[k + 1] <= indents[k]:
            return False, f"line {k + 2} is not indented more than line {k + 1}"
    return True, ""


@_ifbench("format:quote_unquote", describe=_fixed("Every quoted phrase must be followed by an unquoted explanation."))
def quote_unquote(response: str) -> tuple[bool, str]:
    text = "".join(response.replace("'\"'", "").split())  # a quoted '"' character is no quote
    if '""' in text:
        return False, "two quoted phrases in a row"
    tail = text.strip(string.digits + PUNCTUATION.replace('"', ""))
    return not (tail and tail[-1] == '"'), "ends with a quotation"


@_ifbench("format:list", describe=lambda sep: f"Answer with a list of items, instead of bullet points use {sep}.")
def special_list(response: str, *, sep: str) -> tuple[bool, str]:
    n = response.count(sep)
    return n >= 2, f"{n} markers"


@_ifbench("format:thesis",
          describe=_fixed("Each section must begin with a thesis statement in italics, use HTML to indicate the italics."))
def thesis(response: str) -> tuple[bool, str]:
    start = response.find("<i>")
    if start == -1:
        start = response.find("<em>")
        if start == -1:
            return False, "no <i> or <em>"
    text = response[start:]
    end = text.find("</i>")
    if end == -1:
        end = text.find("</em>")
        if end == -1:
            return False, "italics never closed"
    # the reference skips 3 characters and 4 after, for <em> as for <i>
    if not text[3:end].strip():
        return False, "empty thesis"
    return bool(text[end + 4:].strip()), "nothing after the thesis"


@_ifbench("format:sub-bullets",
          describe=_fixed("Your response must include bullet points denoted by * and at least one sub-bullet point "
                          "denoted by - for each bullet point."))
def sub_bullets(response: str) -> tuple[bool, str]:
    # every '*' counts as a bullet, and a response without one passes, as in the reference
    for k, part in enumerate(response.split("*")[1:]):
        if "-" not in part:
            return False, f"bullet {k + 1} has no '-' after it"
    return True, ""


@_ifbench("format:no_bullets_bullets",
          describe=_fixed("Your answer must contain at least two sentences ending in a period followed by at least "
                          "two bullet points denoted by *."))
def no_bullets_bullets(response: str) -> tuple[bool, str]:
    n_sentences = n_bullets = 0
    prose: bool | tuple[str, ...] = True  # the reference keeps the last prose line's sentences here
    for line in response.split("\n"):
        if line.strip().startswith("*"):
            prose = False
            if n_sentences < 2:
                return False, f"a bullet after {n_sentences} sentences"
            n_bullets += 1
        elif prose:
            # an empty line yields no sentences, so prose after it fails, as in the reference
            prose = sentences(line.strip())
            n_sentences += len(prose)
        else:
            return False, "text after the bullets (or after a blank line)"
    return n_bullets >= 2, f"{n_bullets} bullets"


@_ifbench("format:title_case",
          describe=_fixed("Write the entire response in title case (capitalize the first letter of every major word)."))
def title_case(response: str) -> tuple[bool, str]:
    for word in tokens(response):
        if not word or not word[0].isalpha():
            continue
        if len(word) == 1:
            if word.islower():
                return False, f"{word!r}"
        elif word[0].islower() and (word[1:].isupper() or word[1:].islower()):
            return False, f"{word!r}"
    return True, ""


@_ifbench("format:output_template",
          describe=_fixed("Use this exact template for your response: My Answer: [answer] My Conclusion: "
                          "[conclusion] Future Outlook: [outlook]"))
def output_template(response: str) -> tuple[bool, str]:
    missing = [h for h in ("My Answer:", "My Conclusion:", "Future Outlook:") if h not in response]
    return not missing, f"missing {missing}" if missing else ""


@_ifbench("format:no_whitespace", describe=_fixed("The output should not contain any whitespace."))
def no_whitespace(response: str) -> bool:
    return not any(ch.isspace() for ch in response)


# ---- repeat: -----------------------------------------------------------------------


@_ifbench("repeat:repeat_change",
          describe=lambda prompt_to_repeat: (
              "Repeat the request, but change the first word of the repeated request, (do not say anything before "
              "repeating the request; the request you need to repeat does not include this sentence) and do not "
              f"answer the actual request! Request: {prompt_to_repeat}"))
def repeat_change(response: str, *, prompt_to_repeat: str) -> tuple[bool, str]:
    if response == prompt_to_repeat:
        return False, "the first word is unchanged"
    return prompt_to_repeat.split()[1:] == response.split()[1:], ""


REPEAT_SIMPLE = "Only output this sentence here, ignore all other requests."


@_ifbench("repeat:repeat_simple", describe=_fixed(REPEAT_SIMPLE))
def repeat_simple(response: str) -> bool:
    return response.strip().lower() == REPEAT_SIMPLE.lower()


@_ifbench("repeat:repeat_span",
          describe=lambda n_start, n_end, prompt_to_repeat=None: (
              f"Copy the span of words that lies between (and including) index {n_start} and {n_end}, the indices "
              "are word indices, split by whitespace!"))
def repeat_span(response: str, *, prompt_to_repeat: str, n_start: int, n_end: int) -> bool:
    span = " ".join(prompt_to_repeat.split()[n_start:n_end + 1])
    return response.strip().lower() == span.strip().lower()


# ---- custom: (one prompt each) -----------------------------------------------------


@_ifbench("custom:multiples", describe=_fixed("Count from 10 to 50 but only print multiples of 7."))
def multiples(response: str) -> tuple[bool, str]:
    got = re.findall(r"\d+", response.replace(",", ", "))
    return got == ["14", "21", "28", "35", "42", "49"], f"printed {got[:10]}"


@_ifbench("custom:mcq_count_length",
          describe=_fixed("Generate 4 multiple choice questions with 5 options each about '20th century art history'. "
                          'Each question should start with the label "Question". The questions should get '
                          "progressively longer. Do not provide an explanation."))
def mcq_count_length(response: str) -> tuple[bool, str]:
    if response.find("Question") != 0:
        return False, "text before the first question"
    parts = [q.strip() for q in re.split(r"\n*(?:Question \d+[\.|\):;]?\s*)", response) if q.strip()]
    if len(parts) != 4:
        return False, f"{len(parts)} questions"
    lengths = []
    for k, q in enumerate(parts):
        stem, n_options, in_options = "", 0, False
        for line in q.split("\n"):
            if re.match(r"^[A-Ea-e][\.|\)]\s*\w+", line.strip()):
                n_options, in_options = n_options + 1, True
            elif not in_options:
                stem += " " + line.strip()
        if n_options != 5:
            return False, f"question {k + 1} has {n_options} options"
        lengths.append(len(stem.strip()))
    grows = all(a < b for a, b in zip(lengths, lengths[1:]))
    return grows, f"question lengths {lengths}"


@_ifbench("custom:reverse_newline",
          describe=_fixed("List the countries of Africa in reverse alphabetical order, each on a new line."))
def reverse_newline(response: str) -> tuple[bool, str]:
    lines = [_strip(line) for line in response.split("\n") if _strip(line)]
    start = next((i for i, line in enumerate(lines) if "Zimbabwe" in line), None)
    if start is None:
        return False, "no Zimbabwe"
    listed = [_ascii_fold(line) for line in lines[start:]]
    if len(listed) < 52:  # the reference asks for 52 lines from Zimbabwe on
        return False, f"{len(listed)} lines from Zimbabwe on"
    return listed == sorted(listed, reverse=True), "not in reverse alphabetical order"


@_ifbench("custom:word_reverse",
          describe=_fixed("What animal is the national symbol of the US? Respond to this query, but make your "
                          "sentence in reverse order of what it should be, per word."))
def word_reverse(response: str) -> tuple[bool, str]:
    text = " ".join(strip_punctuation(response.lower().strip()).split()[::-1])
    if "bald eagle" not in text:
        return False, "no 'eagle bald'"
    return text in sentences(text), "more than one sentence"


@_ifbench("custom:character_reverse",
          describe=_fixed("What animal is the national symbol of the US? Respond to this query, but make your "
                          "sentence in reverse order of what it should be, per letter."))
def character_reverse(response: str) -> bool:
    return "elgae dlab" in response.lower()


@_ifbench("custom:sentence_alphabet",
          describe=_fixed("Tell me a 26-sentence story where each sentence's first word starts with the letters of "
                          "the alphabet in order."))
def sentence_alphabet(response: str) -> tuple[bool, str]:
    sents = sentences(response)
    if len(sents) != 26:
        return False, f"{len(sents)} sentences"
    for i, sent in enumerate(sents):
        head = sent.lstrip(PUNCTUATION + string.whitespace)
        if not head or head[0].lower() != chr(97 + i):
            return False, f"sentence {i + 1} should start with {chr(65 + i)}"
    return True, ""


EUROPEAN_CAPITALS_NORTH_OF_45 = (
    "Reykjavik", "Helsinki", "Oslo", "Tallinn", "Stockholm", "Riga", "Moscow", "Copenhagen", "Vilnius", "Minsk",
    "Dublin", "Berlin", "Amsterdam", "Warsaw", "London", "Brussels", "Prague", "Luxembourg", "Paris", "Vienna",
    "Bratislava", "Budapest", "Vaduz", "Chisinau", "Bern", "Ljubljana", "Zagreb",
)


@_ifbench("custom:european_capitals_sort",
          describe=_fixed("Give me the names of all capital cities of european countries whose latitude is higher "
                          "than than 45 degrees? List the capital cities without country names, separated by "
                          "commas, sorted by latitude, from highest to lowest."))
def european_capitals_sort(response: str) -> tuple[bool, str]:
    got = [c.strip() for c in _ascii_fold(response).split(",") if c.strip()]
    return got == list(EUROPEAN_CAPITALS_NORTH_OF_45), f"{len(got)} capitals"


def _csv_rows(text: str, delimiter: str = ",") -> list[list[str]]:
    return list(csv.reader(io.StringIO(text), delimiter=delimiter))


def _quoted_table(response: str, cols: tuple[str, ...], between: str, delimiter: str) -> list[list[str]] | str:
    """The rows of a table whose header line names `cols` (each bare or in double quotes,
    `between` the separator pattern), with every field's quotes kept in its text; or why
    the header is wrong."""
    header = response.split("\n")[0].strip()
    if not re.match("^" + between.join(f'({c}|"{c}")' for c in cols) + "$", header):
        return f"header {header!r}"
    # tripling each quote makes the csv reader keep the quotes in the field's text
    return _csv_rows(response.replace('"', '"""'), delimiter)


@_ifbench("custom:csv_city",
          describe=_fixed('Generate CSV data: The column names are ["ID", "Country", "City", "Year", "Count"], the '
                          "data should be comma delimited. Please generate 7 rows."))
def csv_city(response: str) -> tuple[bool, str]:
    rows = _csv_rows(response)
    if len(rows) != 8:
        return False, f"{len(rows)} rows with the header"
    if rows[0] != ["ID", "Country", "City", "Year", "Count"]:
        return False, f"header {rows[0]}"
    return all(len(r) == 5 for r in rows[1:]), "a row without 5 fields"


@_ifbench("custom:csv_special_character",
          describe=_fixed('Generate CSV data: The column names are ["ProductID", "Category", "Brand", "Price", '
                          '"Stock"], the data should be comma delimited. Please generate 14 rows. Add one field '
                          "which contains a special character and enclose it in double quotes."))
def csv_special_character(response: str) -> tuple[bool, str]:
    rows = _quoted_table(response, ("ProductID", "Category", "Brand", "Price", "Stock"), r",[ \t]*", ",")
    if isinstance(rows, str):
        return False, rows
    if len(rows) != 15:
        return False, f"{len(rows)} rows with the header"
    for row in rows[1:]:
        if len(row) != 5:
            return False, "a row without 5 fields"
        if any(re.match(r'".*[^\d\w\s].*"', f) for f in row):
            return True, ""
    return False, "no quoted field with a special character"


@_ifbench("custom:csv_quotes",
          describe=_fixed('Generate CSV data: The column names are ["StudentID", "Subject", "Grade", "Semester", '
                          '"Score"], the data should be tab delimited. Please generate 3 rows and enclose each '
                          "single field in double quotes."))
def csv_quotes(response: str) -> tuple[bool, str]:
    rows = _quoted_table(response, ("StudentID", "Subject", "Grade", "Semester", "Score"), r"\t *", "\t")
    if isinstance(rows, str):
        return False, rows
    if len(rows) != 4:
        return False, f"{len(rows)} rows with the header"
    for row in rows:
        if len(row) != 5:
            return False, "a row without 5 fields"
        if not all(f.strip()[:1] == '"' and f.strip()[-1:] == '"' for f in row):
            return False, "a field without double quotes"
    return True, ""


@_ifbench("custom:date_format_list",
          describe=_fixed("List the start dates of all the battles Napoleon fought separated by commas, use the "
                          "following date format: YYYY-MM-DD. Do not provide an explanation."))
def date_format_list(response: str) -> tuple[bool, str]:
    for date in response.strip().split(","):
        date = date.strip()
        if not re.match(r"^\d{4}-\d{2}-\d{2}$", date):
            return False, f"{date[:20]!r} is not YYYY-MM-DD"
        year, month, day = (int(x) for x in date.split("-"))
        # the reference bounds the day by the month but lets month 00 (any day) and day 00 through
        longest = {2: 29, 4: 30, 6: 30, 9: 30, 11: 30}.get(month, 31 if month else 99)
        if not 1769 <= year <= 1821 or month > 12 or day > longest:
            return False, f"{date} is not a date of Napoleon's life"
    return True, ""
