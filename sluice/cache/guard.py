"""The lexical guard of the semantic cache: cheap features that must agree before a near neighbour is a hit.

Sentence embeddings are nearly blind to the words that change an answer. Cosine similarity with
all-MiniLM-L6-v2: "Did Rome defeat Carthage?" / "Did Carthage defeat Rome?" 0.998, "Is Paris bigger than
London?" / "Is London bigger than Paris?" 0.992, "Can I take ibuprofen with alcohol?" / "... without
alcohol?" 0.945, "What is 15% of 80?" / "... of 90?" 0.81. So a stored question
whose vector is close enough is served only if `compatible(stored, asked)` also holds, which requires:

- **numbers**: the same set of numbers, written as digits or words ("5" = "five", "twenty-five" = "25",
  "1,000" = "1000", "2.50" = "2.5");
- **negation**: the same count of negation cues ("not", "n't", "never", "no", "none", "nothing", "without",
  "except", "cannot", and the apostrophe-less "dont", "cant", ...);
- **names**: every capitalised or all-caps word of one text (an entity, an acronym, a language, a product)
  appears in the other, compared without case, so "paris" still matches "Paris"; a capital that opens a
  sentence marks no name (unless the word is all caps), and in Title Case text only acronyms are names;
- **name order**: two names that both texts contain, and that are not listed together ("A and B", "A, B"),
  come in the same order ("Did Rome defeat Carthage?" ≠ "Did Carthage defeat Rome?");
- **marked words**: the same set of canonical units ("km" = "kilometres"; "$" = "dollars"), output formats
  and languages ("json", "table", "french", "python"), and comparison or direction words, where synonyms
  share a canonical form and antonyms do not ("bigger" = "larger" ≠ "smaller"; "before" ≠ "after";
  "increase" ≠ "decrease");
- **direction**: when both texts point somewhere with "to", "into" or "than", they point at the same
  names, numbers or units ("from English to French" ≠ "from French to English", "km to miles" ≠ "miles to
  km"; but "5 km to miles" = "how many miles is 5 km").

Case, punctuation, whitespace and word order otherwise do not matter. Measured with `make cache-eval`
(docs/benchmarks.md, "Semantic cache evaluation"): on 122 hand-written look-alikes the embedding alone
serves 75 % at threshold 0.80 and 11 % at 0.99; with the guard none at any threshold, while it passes 120
of 121 rewordings. On STS-B it cuts false hits by about two thirds (0.95: 1.0 % → 0.3 %) and rejects 36 %
of the pairs annotators scored >= 4 (mostly headlines adding or dropping a name): misses, not wrong answers.
Names cause most rejections, then the marked words, then numbers. About 40 µs for two new long sentences,
2 µs once their features are cached (per text, `features` is memoised).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# Digits (with thousands separators or a decimal part), words (with inner apostrophes), or a unit symbol.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+(?:['’][^\W\d_]+)*|[$€£¥%°]")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+")
_SENTENCES = re.compile(r"[.?!:;]+(?:\s+|$)|\n+")  # a sentence ends where its punctuation meets a space

_NEGATIONS = frozenset(
    [
        "not",
        "no",
        "never",
        "none",
        "nobody",
        "nothing",
        "neither",
        "nor",
        "nowhere",
        "without",
        "except",
        "excluding",
        "cannot",
        "dont",
        "doesnt",
        "didnt",
        "isnt",
        "arent",
        "wasnt",
        "werent",
        "cant",
        "couldnt",
        "wouldnt",
        "shouldnt",
        "wont",
        "havent",
        "hasnt",
        "hadnt",
        "aint",
    ]
)

_SMALL = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_NUMBER_WORDS: dict[str, int] = {word: value for value, word in enumerate(_SMALL)}
_NUMBER_WORDS.update({word: 20 + 10 * i for i, word in enumerate(_TENS)})
_NUMBER_WORDS["dozen"] = 12
_MULTIPLIERS = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}

# Words whose replacement changes the question; a word maps to its canonical form (synonyms share one).
_MARKED_GROUPS: dict[str, str] = {
    # units
    "km": "km kms kilometer kilometers kilometre kilometres",
    "mile": "mile miles mi",
    "m": "meter meters metre metres",
    "cm": "cm centimeter centimeters centimetre centimetres",
    "mm": "mm millimeter millimeters millimetre millimetres",
    "ft": "ft foot feet",
    "inch": "inch inches",
    "yard": "yard yards yd",
    "kg": "kg kgs kilogram kilograms kilo kilos",
    "g": "gram grams",
    "lb": "lb lbs pound pounds",
    "oz": "oz ounce ounces",
    "l": "liter liters litre litres",
    "ml": "ml milliliter milliliters millilitre millilitres",
    "gallon": "gallon gallons gal",
    "celsius": "celsius centigrade",
    "fahrenheit": "fahrenheit",
    "kelvin": "kelvin",
    "usd": "usd $ dollar dollars",
    "eur": "eur € euro euros",
    "gbp": "gbp £ sterling",
    "jpy": "jpy ¥ yen",
    "percent": "% percent percentage",
    "second": "seconds secs",
    "minute": "minute minutes mins",
    "hour": "hour hours hr hrs",
    "day": "day days",
    "week": "week weeks",
    "month": "month months",
    "year": "year years yr yrs",
    "kb": "kb kilobyte kilobytes",
    "mb": "mb megabyte megabytes",
    "gb": "gb gigabyte gigabytes",
    "tb": "tb terabyte terabytes",
    "mph": "mph",
    "kmh": "kmh kph",
    "calorie": "calorie calories kcal",
    # output formats
    "json": "json",
    "yaml": "yaml yml",
    "xml": "xml",
    "csv": "csv",
    "markdown": "markdown",
    "html": "html",
    "table": "table tables tabular",
    "list": "list lists bullet bullets",
    "paragraph": "paragraph paragraphs",
    "sentence": "sentence sentences",
    "word": "word words",
    "haiku": "haiku",
    "poem": "poem poems",
    "essay": "essay essays",
    "email": "email emails",
    # languages people ask for in lower case
    "english": "english",
    "french": "french",
    "spanish": "spanish",
    "german": "german",
    "italian": "italian",
    "portuguese": "portuguese",
    "dutch": "dutch",
    "russian": "russian",
    "chinese": "chinese mandarin",
    "japanese": "japanese",
    "korean": "korean",
    "arabic": "arabic",
    "hindi": "hindi",
    "python": "python",
    "javascript": "javascript js",
    "typescript": "typescript ts",
    "java": "java",
    "rust": "rust",
    "golang": "golang",
    "ruby": "ruby",
    "php": "php",
    "sql": "sql",
    "bash": "bash shell",
    "kotlin": "kotlin",
    # comparison and direction
    "more": "more greater larger bigger higher above exceed exceeds",
    "less": "less fewer smaller lower below",
    "most": "most greatest largest biggest highest maximum max",
    "least": "least fewest smallest lowest minimum min",
    "better": "better",
    "worse": "worse",
    "best": "best",
    "worst": "worst",
    "faster": "faster fastest quicker quickest",
    "slower": "slower slowest",
    "older": "older oldest",
    "younger": "younger youngest",
    "longer": "longer longest",
    "shorter": "shorter shortest",
    "hotter": "hotter hottest warmer warmest",
    "colder": "colder coldest cooler coolest",
    "cheaper": "cheaper cheapest",
    "expensive": "expensive pricier",
    "before": "before earlier prior",
    "after": "after later",
    "increase": "increase increases increased increasing",
    "decrease": "decrease decreases decreased decreasing",
    "first": "first",
    "last": "last",
    "buy": "buy buying",
    "sell": "sell selling",
    "add": "add adding",
    "remove": "remove removing delete deleting",
    "enable": "enable enabling",
    "disable": "disable disabling",
    "encrypt": "encrypt encrypting",
    "decrypt": "decrypt decrypting",
    "upload": "upload uploading",
    "download": "download downloading",
    "import": "import importing",
    "export": "export exporting",
}
_MARKED: dict[str, str] = {word: canon for canon, words in _MARKED_GROUPS.items() for word in words.split()}

_CONNECTORS = frozenset({"and", "or", "vs", "versus", "&"})
_DIRECTION = frozenset({"to", "into", "than"})
_SKIPPABLE = frozenset({"the", "a", "an"})


@dataclass(frozen=True, slots=True)
class Features:
    """What must agree between two texts, extracted once per text."""

    tokens: frozenset[str]  # every word, lower case, possessive 's removed
    numbers: frozenset[str]
    negations: int
    names: frozenset[str]
    name_groups: tuple[tuple[str, int], ...]  # each name and its group, in order of appearance
    marked: frozenset[str]
    targets: frozenset[str]  # names, numbers and units right after "to", "into" or "than"
    anchored: frozenset[str]  # names, numbers and units that could be a target (to compare `targets` on)


def compatible(a: str, b: str) -> bool:
    """Whether `a` and `b` may be the same question as far as cheap lexical features can tell."""
    if a == b:
        return True
    fa, fb = features(a), features(b)
    return (
        fa.numbers == fb.numbers
        and fa.negations == fb.negations
        and fa.marked == fb.marked
        and fa.names <= fb.tokens
        and fb.names <= fa.tokens
        and _same_direction(fa, fb)
        and _same_order(fa, fb)
    )


def _same_order(fa: Features, fb: Features) -> bool:
    # "Did Rome defeat Carthage?" and "Did Carthage defeat Rome?" share every word; only the order tells.
    # Names listed together ("Paris and London", "Paris, London") may come in any order.
    ga, gb = dict(fa.name_groups), dict(fb.name_groups)
    shared = [name for name in ga if name in gb]
    for i, x in enumerate(shared):
        for y in shared[i + 1 :]:
            if ga[x] != ga[y] and gb[x] != gb[y] and (ga[x] < ga[y]) != (gb[x] < gb[y]):
                return False
    return True


def _same_direction(fa: Features, fb: Features) -> bool:
    # Only when both texts point somewhere: "5 km to miles" and "how many miles is 5 km" are one question.
    ta, tb = fa.targets & fb.anchored, fb.targets & fa.anchored
    return ta == tb or not ta or not tb


@lru_cache(maxsize=16384)
def features(text: str) -> Features:
    """The guard's features of `text` (cached: a stored question is compared with many asked ones)."""
    words: list[str] = []
    capitalised: list[tuple[int, str, bool]] = []  # (word index, word, all caps) of name candidates
    numbers: set[str] = set()
    run: list[str] = []  # consecutive number words, read as one number
    long_words = capitalised_long = 0  # for telling Title Case
    for sentence in _SENTENCES.split(text):
        for position, token in enumerate(_TOKEN.findall(sentence)):
            if token[0].isdigit():
                _flush(run, numbers)
                numbers.add(_normalise_number(token))
                words.append(token)
                continue
            word = token.lower().replace("’", "'")
            if word.endswith("'s"):
                word = word[:-2]
            if word in _NUMBER_WORDS or word in _MULTIPLIERS or (word == "and" and run):
                run.append(word)
            else:
                _flush(run, numbers)
            upper = token[0].isupper()
            if words and len(token) >= 4:
                long_words += 1
                capitalised_long += upper
            all_caps = len(token) > 1 and token.isupper()
            # A capital opening a sentence says nothing, unless the word is an acronym.
            if upper and (all_caps or position > 0) and not _is_first_person(word):
                capitalised.append((len(words), word, all_caps))
            words.append(word)
    _flush(run, numbers)
    # Title Case ("Nelson Mandela Dies At 95") capitalises everything: only acronyms are names there.
    title_case = long_words >= 3 and capitalised_long == long_words
    names: dict[str, int] = {}  # name -> its group: names joined by "and", "or", commas are one group
    group, last = 0, -2
    for index, word, all_caps in capitalised:
        if title_case and not all_caps:
            continue
        if index - last > 1 and any(w not in _CONNECTORS for w in words[last + 1 : index]):
            group += 1
        names.setdefault(word, group)
        last = index
    anchored = set(names) | numbers | {w for w in words if w in _MARKED}
    targets = set()
    for i, word in enumerate(words):
        if word in _DIRECTION:
            j = i + 1
            while j < len(words) and words[j] in _SKIPPABLE:
                j += 1
            if j < len(words) and words[j] in anchored:
                targets.add(words[j])
    return Features(
        tokens=frozenset(words),
        numbers=frozenset(numbers),
        negations=sum(1 for w in words if w in _NEGATIONS or w.endswith("n't")),
        names=frozenset(names),
        name_groups=tuple(names.items()),
        marked=frozenset(_MARKED[w] for w in words if w in _MARKED),
        targets=frozenset(targets),
        anchored=frozenset(anchored),
    )


def _is_first_person(word: str) -> bool:
    return word == "i" or word.startswith("i'")


def _normalise_number(token: str) -> str:
    if _THOUSANDS.fullmatch(token):
        token = token.replace(",", "")
    if "." in token and token.count(".") == 1:
        token = token.rstrip("0").rstrip(".")
    return token or "0"


def _flush(run: list[str], numbers: set[str]) -> None:
    """Turn a run of number words ("twenty five", "two hundred and ten") into its value."""
    while run and run[-1] == "and":
        run.pop()
    if not run:
        return
    total = current = 0
    for word in run:
        if word in _MULTIPLIERS:
            current = max(current, 1) * _MULTIPLIERS[word]
            if _MULTIPLIERS[word] >= 1000:
                total, current = total + current, 0
        elif word != "and":
            current += _NUMBER_WORDS[word]
    numbers.add(str(total + current))
    run.clear()
