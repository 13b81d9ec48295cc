"""A small, deterministic corpus for the RAG tests: text, Markdown, HTML and PDF files, each about one made-up
topic holding one unique fact, and the questions whose answers are in exactly one file.

    questions = write_corpus(folder)  # [(question, expected source), ...]

PDFs come from a minimal hand-built writer (one Helvetica text page each), so no PDF library is needed to
make them and pypdf reads them the way it reads ordinary text PDFs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

FILES_PER_TYPE = 24
TYPES = ("txt", "md", "html", "pdf")

# (subject, fact template, question template): {n} is the made-up name, {a} {b} made-up values.
SUBJECTS = (
    ("river festival", "The {n} river festival is held every {a}th of {b}.", "When is the {n} river festival held?"),
    ("glassblowers' guild", "The {n} glassblowers' guild admits exactly {a} apprentices each year.",
     "How many apprentices does the {n} glassblowers' guild admit each year?"),
    ("mountain observatory", "The {n} mountain observatory stands {a}00 metres above the {b} valley.",
     "How high does the {n} mountain observatory stand?"),
    ("tea ceremony", "In the {n} tea ceremony the host pours the tea {a} times before serving {b} cakes.",
     "How many times is tea poured in the {n} tea ceremony?"),
    ("lighthouse", "The {n} lighthouse flashes green every {a} seconds to warn ships off the {b} reef.",
     "How often does the {n} lighthouse flash?"),
    ("chess variant", "{n} chess is played on a board of {a} by {a} squares with two {b} pieces per side.",
     "What board size is {n} chess played on?"),
    ("migratory beetle", "The {n} beetle migrates {a}0 kilometres each spring to the {b} marshes.",
     "How far does the {n} beetle migrate?"),
    ("copper mine", "The {n} copper mine was closed in 18{a} after the {b} flood.",
     "When was the {n} copper mine closed?"),
    ("choir", "The {n} choir sings only in the key of {b} minor and has {a} members.",
     "In which key does the {n} choir sing?"),
    ("suspension bridge", "The {n} suspension bridge is held up by {a} cables spun from {b} steel.",
     "How many cables hold up the {n} suspension bridge?"),
    ("cheese", "{n} cheese is aged for {a} months in caves beneath the {b} hills.",
     "How long is {n} cheese aged?"),
    ("kite contest", "The {n} kite contest was last won by a kite shaped like a {b} with a {a} metre tail.",
     "What shape was the kite that last won the {n} kite contest?"),
    ("monastery library", "The {n} monastery library keeps {a} thousand scrolls written in {b} ink.",
     "How many scrolls does the {n} monastery library keep?"),
    ("railway", "The {n} railway climbs a gradient of {a} percent on its way to {b} station.",
     "What gradient does the {n} railway climb?"),
    ("orchid", "The {n} orchid blooms only once every {a} years and smells of {b}.",
     "How often does the {n} orchid bloom?"),
    ("clock tower", "The {n} clock tower runs exactly {a} minutes fast, by decree of the {b} council.",
     "How fast does the {n} clock tower run?"),
    ("salt market", "At the {n} salt market one sack of salt trades for {a} {b} shells.",
     "What does a sack of salt trade for at the {n} salt market?"),
    ("sailing race", "The {n} sailing race starts at the {b} buoy and covers {a} nautical miles.",
     "How long is the {n} sailing race?"),
    ("weaving pattern", "The {n} weaving pattern uses {a} threads of {b} wool in every row.",
     "How many threads does the {n} weaving pattern use in a row?"),
    ("hot spring", "The water of the {n} hot spring stays at {a} degrees even in the {b} winter.",
     "What temperature is the water of the {n} hot spring?"),
    ("dance", "The {n} dance is performed by {a} dancers wearing {b} masks.",
     "How many dancers perform the {n} dance?"),
    ("telescope", "The {n} telescope has a mirror {a} metres wide, polished with {b} sand.",
     "How wide is the mirror of the {n} telescope?"),
    ("bakery", "The {n} bakery bakes its rye bread for {a} hours in an oven fired with {b} wood.",
     "How long does the {n} bakery bake its rye bread?"),
    ("canal", "The {n} canal has {a} locks between the harbour and the {b} lake.",
     "How many locks does the {n} canal have?"),
    ("falcon", "The {n} falcon dives at {a}0 kilometres an hour when hunting {b} pigeons.",
     "How fast does the {n} falcon dive?"),
    ("printing press", "The {n} printing press printed {a} copies of the {b} almanac on its first night.",
     "How many copies did the {n} printing press print on its first night?"),
    ("vineyard", "The {n} vineyard harvests its grapes under the light of the {b} moon every {a}th year.",
     "When does the {n} vineyard harvest its grapes?"),
    ("lantern parade", "The {n} lantern parade carries {a} paper lanterns painted {b}.",
     "How many lanterns does the {n} lantern parade carry?"),
    ("library card", "A {n} library card costs {a} silver coins and must be renewed every {b}.",
     "How much does a {n} library card cost?"),
    ("whale song", "The {n} whale song lasts {a} minutes and repeats only near the {b} shelf.",
     "How long does the {n} whale song last?"),
    ("stone circle", "The {n} stone circle has {a} standing stones, the tallest one carved from {b} granite.",
     "How many standing stones does the {n} stone circle have?"),
    ("spice route", "The {n} spice route crosses {a} deserts before it reaches the port of {b}.",
     "How many deserts does the {n} spice route cross?"),
)  # fmt: skip

SYLLABLES = ("zor", "vel", "quin", "bra", "dol", "mith", "ka", "rune", "tesh", "ul", "nor", "fyr", "ost", "la")
VALUES = ("Ostember", "amber", "cobalt", "Harrowmere", "saffron", "Tillow", "violet", "Brennock", "ochre", "Quarrel")
FILLER = (
    "Travellers who come for the first time are usually surprised by how quiet the place is.",
    "Local historians have written several short pamphlets about its origins.",
    "Most of the records from the early years were lost in a fire and later rewritten from memory.",
    "The surrounding villages take turns looking after it, each for a season.",
    "Children learn its story at school, together with a song that nobody can quite remember.",
    "Several painters have tried to capture it, with mixed results.",
    "In the off season the roads leading there are often closed by snow or mud.",
    "A small museum nearby sells postcards, maps and a booklet with the essential facts.",
)


@dataclass(frozen=True, slots=True)
class CorpusDocument:
    source: str
    title: str
    fact: str
    question: str
    body: list[str]  # paragraphs, the fact among them


def _name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize() + "ian"
        if name not in taken:
            taken.add(name)
            return name


def documents(seed: int = 7) -> list[CorpusDocument]:
    """FILES_PER_TYPE documents of each type, subjects in turn, each with its own made-up name."""
    rng = random.Random(seed)
    taken: set[str] = set()
    docs = []
    for number in range(FILES_PER_TYPE * len(TYPES)):
        subject, fact_template, question_template = SUBJECTS[number % len(SUBJECTS)]
        kind = TYPES[number % len(TYPES)]
        name = _name(rng, taken)
        values = {"n": name, "a": str(rng.randint(3, 97)), "b": rng.choice(VALUES)}
        fact = fact_template.format(**values)
        title = f"The {name} {subject}"
        filler = rng.sample(FILLER, 6)
        body = [
            f"This note describes the {name} {subject}. " + " ".join(filler[:3]),
            " ".join(filler[3:5]) + f" The {name} {subject} is well known in the region.",
            fact + f" Few people outside the region know this about the {name} {subject}.",
            filler[5] + f" More about the {name} {subject} can be found in the regional archive.",
        ]
        folder = "nested/" if number % 5 == 0 else ""
        source = f"{kind}/{folder}{name.lower()}.{kind}"
        docs.append(CorpusDocument(source, title, fact, question_template.format(**values), body))
    return docs


def write_document(folder: Path, doc: CorpusDocument) -> Path:
    path = folder / doc.source
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = path.suffix[1:]
    if kind == "txt":
        path.write_text(doc.title + "\n\n" + "\n\n".join(doc.body) + "\n")
    elif kind == "md":
        path.write_text(f"# {doc.title}\n\n" + "\n\n".join(doc.body) + "\n")
    elif kind == "html":
        paragraphs = "".join(f"<p>{p}</p>\n" for p in doc.body)
        path.write_text(
            f"<!doctype html><html><head><title>{doc.title}</title><style>p {{ color: red }}</style>"
            f"<script>var hidden = 'do not index me';</script></head>\n<body><h1>{doc.title}</h1>\n{paragraphs}"
            "</body></html>\n"
        )
    else:
        path.write_bytes(pdf_bytes(doc.title, doc.body))
    return path


def write_corpus(folder: Path, seed: int = 7) -> list[tuple[str, str]]:
    """Write the corpus under `folder`; the (question, source relative to `folder`) pairs."""
    docs = documents(seed)
    for doc in docs:
        write_document(folder, doc)
    return [(doc.question, doc.source) for doc in docs]


# --- a minimal PDF writer -------------------------------------------------------------------------------


def _pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def _wrap(paragraph: str, width: int = 90) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in paragraph.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def pdf_bytes(title: str, paragraphs: list[str]) -> bytes:
    """A one-page PDF 1.4 with `paragraphs` in Helvetica (ASCII text) and `title` in its Info dictionary."""
    lines = ["BT", "/F1 10 Tf", "14 TL", "50 780 Td"]
    for paragraph in paragraphs:
        for line in _wrap(paragraph):
            lines.append(f"{_pdf_string(line)} Tj T*")
        lines.append("T*")  # a blank line between paragraphs
    lines.append("ET")
    content = "\n".join(lines).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 842] /Resources << /Font << /F1 4 0 R >> >> "
        b"/Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Length " + str(len(content)).encode() + b" >>\nstream\n" + content + b"\nendstream",
        b"<< /Title " + _pdf_string(title).encode("latin-1") + b" /Producer (sluice tests) >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info 6 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)
