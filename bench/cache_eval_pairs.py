"""A hand-written labelled set of near-duplicate questions, as a semantic response cache would see them.

`same=True` pairs are rewordings whose cached answer may be served for the other (paraphrases, changed case,
punctuation, whitespace and word order, digits for number words). `same=False` pairs look alike but need a
different answer: a changed number, a negation, swapped or replaced names, another unit, another output
language or format, a flipped comparison. Some of the latter are beyond a lexical guard (a lower-case
country, an object swapped with its subject): they measure the embedding's threshold alone.

Generated from templates, deterministically (no randomness): `pairs()` returns the same list every run.
"""

from __future__ import annotations

from typing import NamedTuple


class Pair(NamedTuple):
    a: str
    b: str
    same: bool  # True: one may be answered from the other's cache entry
    kind: str  # the family, for the per-kind breakdown


# (template a, template b, fillers): each filler is a tuple formatted into {0}, {1}, ...
_SAME: dict[str, list[tuple[str, str, list[tuple[str, ...]]]]] = {
    "paraphrase": [
        (
            "How do I reset my {0} password?",
            "how can i reset the password for my {0} account",
            [("Gmail",), ("Netflix",), ("Slack",), ("GitHub",), ("Spotify",), ("Dropbox",)],
        ),
        (
            "What is the capital of {0}?",
            "What's {0}'s capital city?",
            [("France",), ("Japan",), ("Brazil",), ("Canada",), ("Kenya",), ("Australia",), ("Norway",)],
        ),
        (
            "What are the symptoms of {0}?",
            "What symptoms does {0} cause?",
            [("diabetes",), ("the flu",), ("measles",), ("anemia",), ("asthma",), ("Lyme disease",)],
        ),
        (
            "Explain {0} in simple terms",
            "Can you explain {0} simply?",
            [("photosynthesis",), ("inflation",), ("recursion",), ("blockchain",), ("quantum entanglement",)],
        ),
        (
            "What is the difference between {0} and {1}?",
            "How does {0} differ from {1}?",
            [("TCP", "UDP"), ("RAM", "ROM"), ("weather", "climate"), ("a virus", "bacteria"), ("stocks", "bonds")],
        ),
        (
            "Who wrote {0}?",
            "Who is the author of {0}?",
            [("Hamlet",), ("War and Peace",), ("Dracula",), ("Frankenstein",), ("Pride and Prejudice",)],
        ),
        (
            "How do I make {0}?",
            "What's a good recipe for {0}?",
            [("pancakes",), ("guacamole",), ("risotto",), ("banana bread",), ("hummus",), ("lasagna",)],
        ),
        (
            "What does {0} stand for?",
            "What is {0} short for?",
            [("NASA",), ("HTML",), ("GDP",), ("DNA",), ("SQL",), ("UNESCO",)],
        ),
        (
            "How do I install {0} on Ubuntu?",
            "how to install {0} on ubuntu",
            [("Docker",), ("nginx",), ("PostgreSQL",), ("Node.js",), ("numpy",)],
        ),
        (
            "What's the population of {0}?",
            "How many people live in {0}?",
            [("Tokyo",), ("Lagos",), ("Berlin",), ("Mexico City",), ("Mumbai",)],
        ),
        (
            "Is it safe to eat raw {0}?",
            "Can you safely eat {0} raw?",
            [("eggs",), ("cookie dough",), ("salmon",), ("oysters",), ("mushrooms",)],
        ),
        (
            "Summarize the plot of {0}",
            "Give me a short summary of the plot of {0}",
            [("Moby Dick",), ("The Odyssey",), ("Hamlet",), ("Macbeth",), ("Don Quixote",)],
        ),
        (
            "What time is it in {0} right now?",
            "current time in {0}",
            [("London",), ("Sydney",), ("New York",), ("Dubai",), ("Seoul",)],
        ),
        (
            "Recommend a good book about {0}",
            "What is a good book on {0}?",
            [("stoicism",), ("machine learning",), ("World War II",), ("investing",), ("astronomy",)],
        ),
        (
            "Why is the sky blue?",
            "What makes the sky blue?",
            [()],
        ),
        (
            "How can I improve my {0}?",
            "What are ways to improve my {0}?",
            [("sleep",), ("posture",), ("credit score",), ("handwriting",), ("memory",)],
        ),
        (
            "Write a Python function that {0}",
            "python function to {1}",
            [
                ("reverses a string", "reverse a string"),
                ("checks if a number is prime", "check whether a number is prime"),
                ("sorts a list of dicts by a key", "sort a list of dicts by key"),
                ("reads a CSV file", "read a csv file"),
            ],
        ),
    ],
    "numbers kept": [
        (
            "What is {0} times {1}?",
            "What's {0} multiplied by {1}?",
            [("7", "8"), ("12", "15"), ("3.5", "4"), ("250", "4"), ("9", "9")],
        ),
        (
            "Convert {0} {1} to {2}",
            "How many {2} is {0} {1}?",
            [
                ("5", "km", "miles"),
                ("100", "pounds", "kilograms"),
                ("30", "celsius", "fahrenheit"),
                ("2", "cups", "ml"),
            ],
        ),
        (
            "Give me {0} tips for {1}",
            "{2} tips for {1}, please",
            [("five", "better sleep", "5"), ("three", "public speaking", "3"), ("ten", "saving money", "10")],
        ),
        (
            "What happened in {0}?",
            "What were the main events of {0}?",
            [("1969",), ("1989",), ("2008",), ("1776",)],
        ),
        (
            "Set a timer for {0} minutes",
            "set a {0} minute timer",
            [("10",), ("25",), ("45",)],
        ),
    ],
    "surface": [
        (
            "{0}",
            "{1}",
            [
                ("WHAT IS THE BOILING POINT OF WATER", "what is the boiling point of water?"),
                ("How  do I   center a div in CSS?", "How do I center a div in CSS"),
                ("what's the weather in Paris today?", "Paris weather today"),
                ("Best way to learn Spanish?", "what is the best way to learn spanish"),
                ("How tall is Mount Everest", "How tall is Mount Everest?!"),
                ("python list comprehension examples", "Examples of list comprehension in Python"),
                ("cheap flights Paris London", "cheap flights, London Paris"),
                ("Is coffee bad for you?", "is coffee bad for you"),
                ("how many bones in the human body", "How many bones are in the human body?"),
                ("Who painted the Mona Lisa?", "who painted the mona lisa"),
                ("tell me a joke about cats", "Tell me a cat joke."),
                ("What year did the Titanic sink?", "When did the Titanic sink?"),
                ("Define entropy.", "What is the definition of entropy?"),
                ("How do I exit vim", "how to quit Vim?"),
                ("Why can't I sleep at night?", "Why can not I sleep at night"),
                ("capital of italy", "Capital of Italy?"),
            ],
        )
    ],
}

_DIFFERENT: dict[str, list[tuple[str, str, list[tuple[str, ...]]]]] = {
    "number": [
        (
            "What is {0} times {1}?",
            "What is {0} times {2}?",
            [("7", "8", "9"), ("12", "15", "16"), ("25", "4", "40"), ("6", "7", "17")],
        ),
        (
            "What is {0}% of {1}?",
            "What is {0}% of {2}?",
            [("15", "80", "90"), ("20", "150", "250"), ("7.5", "200", "300")],
        ),
        (
            "Convert {0} km to miles",
            "Convert {1} km to miles",
            [("5", "50"), ("10", "12"), ("42", "21")],
        ),
        (
            "Set a timer for {0} minutes",
            "Set a timer for {1} minutes",
            [("10", "15"), ("5", "50"), ("30", "3")],
        ),
        (
            "What happened in {0}?",
            "What happened in {1}?",
            [("1969", "1968"), ("1989", "1991"), ("2008", "2001")],
        ),
        (
            "Give me {0} tips for {1}",
            "Give me {2} tips for {1}",
            [("three", "public speaking", "five"), ("5", "saving money", "10"), ("two", "better sleep", "seven")],
        ),
        (
            "How much is a {0} tip on a ${1} bill?",
            "How much is a {2} tip on a ${1} bill?",
            [("15%", "80", "20%"), ("18%", "64", "10%")],
        ),
        (
            "What is the square root of {0}?",
            "What is the square root of {1}?",
            [("144", "169"), ("2", "3")],
        ),
        (
            "Plan a {0}-day trip to {1}",
            "Plan a {2}-day trip to {1}",
            [("3", "Rome", "7"), ("five", "Japan", "ten")],
        ),
    ],
    "negation": [
        (
            "Can I take {0} with alcohol?",
            "Can I take {0} without alcohol?",
            [("ibuprofen",), ("paracetamol",), ("antibiotics",), ("melatonin",)],
        ),
        (
            "Why is my {0} working?",
            "Why isn't my {0} working?",
            [("wifi",), ("printer",), ("code",), ("dishwasher",)],
        ),
        (
            "Which foods are high in {0}?",
            "Which foods are not high in {0}?",
            [("iron",), ("sugar",), ("fiber",)],
        ),
        (
            "Things to do in {0} with kids",
            "Things to do in {0} without kids",
            [("Paris",), ("London",), ("Barcelona",)],
        ),
        (
            "Should I {0}?",
            "Should I never {0}?",
            [("water succulents daily",), ("stretch before running",), ("restart my router",)],
        ),
        (
            "Is {0} a good idea?",
            "Is {0} not a good idea?",
            [("intermittent fasting",), ("renting a car in Rome",), ("learning Rust first",)],
        ),
        (
            "I can {0}, what should I do?",
            "I can't {0}, what should I do?",
            [("sleep",), ("focus",), ("log in",)],
        ),
    ],
    "swapped names": [
        (
            "Is {0} bigger than {1}?",
            "Is {1} bigger than {0}?",
            [("Paris", "London"), ("Texas", "France"), ("Jupiter", "Saturn"), ("Canada", "Russia")],
        ),
        (
            "Translate this from {0} to {1}",
            "Translate this from {1} to {0}",
            [("English", "French"), ("German", "Spanish"), ("Japanese", "English")],
        ),
        (
            "Cheapest flights from {0} to {1}",
            "Cheapest flights from {1} to {0}",
            [("Paris", "London"), ("Boston", "Chicago"), ("Madrid", "Lisbon")],
        ),
        (
            "Did {0} defeat {1}?",
            "Did {1} defeat {0}?",
            [("Rome", "Carthage"), ("Napoleon", "Wellington")],
        ),
    ],
    "changed name": [
        (
            "What is the capital of {0}?",
            "What is the capital of {1}?",
            [("France", "Spain"), ("Japan", "China"), ("Brazil", "Argentina"), ("Canada", "Mexico")],
        ),
        (
            "Who wrote {0}?",
            "Who wrote {1}?",
            [("Hamlet", "Macbeth"), ("Dracula", "Frankenstein"), ("Emma", "Persuasion")],
        ),
        (
            "How do I install {0} on Ubuntu?",
            "How do I install {0} on {1}?",
            [("Docker", "Windows"), ("nginx", "macOS"), ("PostgreSQL", "Debian")],
        ),
        (
            "What's the population of {0}?",
            "What's the population of {1}?",
            [("Tokyo", "Osaka"), ("Berlin", "Munich"), ("Sydney", "Melbourne")],
        ),
        (
            "capital of {0}",
            "capital of {1}",
            [("france", "spain"), ("japan", "china"), ("peru", "chile")],
        ),
        (
            "Tell me about vitamin {0}",
            "Tell me about vitamin {1}",
            [("C", "D"), ("B12", "B6")],
        ),
    ],
    "unit": [
        (
            "Convert {0} {1} to {2}",
            "Convert {0} {1} to {3}",
            [
                ("10", "km", "miles", "meters"),
                ("30", "celsius", "fahrenheit", "kelvin"),
                ("100", "dollars", "euros", "pounds"),
                ("5", "gallons", "liters", "quarts"),
            ],
        ),
        (
            "Convert {0} {1} to {2}",
            "Convert {0} {2} to {1}",
            [("10", "km", "miles"), ("100", "euros", "dollars"), ("5", "kg", "pounds")],
        ),
        (
            "How many calories are in 100 {0} of {1}?",
            "How many calories are in 100 {2} of {1}?",
            [("grams", "rice", "ounces"), ("g", "chicken", "lbs")],
        ),
        (
            "How long does it take to drive 200 {0}?",
            "How long does it take to drive 200 {1}?",
            [("miles", "kilometers")],
        ),
        (
            "Cook the chicken for 20 {0}",
            "Cook the chicken for 20 {1}",
            [("minutes", "hours")],
        ),
    ],
    "language or format": [
        (
            "Translate 'good morning' into {0}",
            "Translate 'good morning' into {1}",
            [("French", "Spanish"), ("German", "Italian"), ("Japanese", "Korean"), ("russian", "dutch")],
        ),
        (
            "List the planets of the solar system {0}",
            "List the planets of the solar system {1}",
            [("as JSON", "as YAML"), ("in a table", "as a bullet list"), ("in JSON", "as CSV")],
        ),
        (
            "Write a {0} about {1}",
            "Write a {2} about {1}",
            [("haiku", "autumn", "poem"), ("poem", "the sea", "essay"), ("haiku", "coffee", "limerick")],
        ),
        (
            "Explain {0} in one {1}",
            "Explain {0} in one {2}",
            [("recursion", "sentence", "paragraph"), ("inflation", "sentence", "paragraph")],
        ),
        (
            "Write a function to reverse a string in {0}",
            "Write a function to reverse a string in {1}",
            [("Python", "JavaScript"), ("Rust", "Go"), ("java", "kotlin")],
        ),
    ],
    "comparison": [
        (
            "Which is {0} expensive, {1}?",
            "Which is {2} expensive, {1}?",
            [("more", "an iPhone or a Pixel", "less"), ("more", "Tokyo or Paris", "less")],
        ),
        (
            "What happened {0} {1}?",
            "What happened {2} {1}?",
            [("before", "the French Revolution", "after"), ("before", "the moon landing", "after")],
        ),
        (
            "How do I {0} my {1}?",
            "How do I {2} my {1}?",
            [("increase", "credit limit", "decrease"), ("increase", "blood pressure", "decrease")],
        ),
        (
            "What is the {0} planet in the solar system?",
            "What is the {1} planet in the solar system?",
            [("largest", "smallest"), ("hottest", "coldest")],
        ),
        (
            "What is the {0} way to learn {1}?",
            "What is the {2} way to learn {1}?",
            [("best", "piano", "worst"), ("fastest", "Spanish", "slowest")],
        ),
        (
            "How do I {0} a file in Linux?",
            "How do I {1} a file in Linux?",
            [("encrypt", "decrypt"), ("upload", "download"), ("delete", "create")],
        ),
    ],
    "changed topic": [
        (
            "How do I cook {0}?",
            "How do I cook {1}?",
            [("rice", "pasta"), ("salmon", "tuna"), ("broccoli", "spinach")],
        ),
        (
            "What are the side effects of {0}?",
            "What are the side effects of {1}?",
            [("ibuprofen", "aspirin"), ("coffee", "green tea")],
        ),
    ],
}


def _expand(groups: dict[str, list[tuple[str, str, list[tuple[str, ...]]]]], same: bool) -> list[Pair]:
    out: list[Pair] = []
    for kind, templates in groups.items():
        for template_a, template_b, fillers in templates:
            for filler in fillers:
                out.append(Pair(template_a.format(*filler), template_b.format(*filler), same, kind))
    return out


def pairs() -> list[Pair]:
    """Every labelled pair (similarity and the guard are symmetric, so each pair appears in one order)."""
    return _expand(_SAME, True) + _expand(_DIFFERENT, False)
