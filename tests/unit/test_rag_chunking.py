"""Chunking (sizes, overlap, word and sentence boundaries, determinism) and the document loaders on tiny inputs."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from sluice.rag.chunking import ApproximateCounter, TokenCounter, WordPieceCounter, local_counter, split
from sluice.rag.loaders import UnreadableDocument, load, supported
from tests.rag_corpus import pdf_bytes

SENTENCES = [f"Sentence number {i} talks about the Zorvian river festival and its {i * 7} lanterns." for i in range(60)]
TEXT = " ".join(SENTENCES[:30]) + "\n\n" + " ".join(SENTENCES[30:])


@pytest.fixture(scope="module")
def wordpiece() -> WordPieceCounter:
    return local_counter()


def tokens(counter: TokenCounter, text: str) -> float:
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    return sum(counter.word_tokens(text, words))


@pytest.mark.parametrize("size,overlap", [(32, 0), (64, 8), (128, 32), (256, 32)])
def test_chunks_fit_and_cover_the_text_in_order(wordpiece: WordPieceCounter, size: int, overlap: int) -> None:
    chunks = split(TEXT, size, overlap, wordpiece)
    assert len(chunks) > 1
    for chunk in chunks:
        assert tokens(wordpiece, chunk) <= size
        assert chunk == chunk.strip() and chunk in TEXT  # whole words, verbatim
    # Every word of the text is in some chunk, and chunks move forward through it.
    positions = [TEXT.index(chunk) for chunk in chunks]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert positions[0] == 0 and TEXT.endswith(chunks[-1])
    for previous, start in zip(chunks, positions[1:], strict=False):
        end_of_previous = TEXT.index(previous) + len(previous)
        assert start <= end_of_previous + 2, "no gap between chunks"
        shared = TEXT[start:end_of_previous]
        assert tokens(wordpiece, shared) <= overlap
        if overlap == 0:
            assert not shared.strip()


def test_overlap_repeats_the_end_of_the_previous_chunk(wordpiece: WordPieceCounter) -> None:
    chunks = split(TEXT, 64, 16, wordpiece)
    for previous, following in itertools.pairwise(chunks):
        start = TEXT.index(following)
        shared = TEXT[start : TEXT.index(previous) + len(previous)]
        assert shared and previous.endswith(shared) and following.startswith(shared)
        assert 0 < tokens(wordpiece, shared) <= 16


def test_chunks_end_after_sentences_when_they_can(wordpiece: WordPieceCounter) -> None:
    chunks = split(TEXT, 64, 0, wordpiece)
    assert all(chunk.endswith(".") for chunk in chunks)


def test_deterministic_and_counter_specific(wordpiece: WordPieceCounter) -> None:
    assert split(TEXT, 64, 8, wordpiece) == split(TEXT, 64, 8, local_counter())
    approximate = split(TEXT, 64, 8, ApproximateCounter())
    assert approximate == split(TEXT, 64, 8, ApproximateCounter())
    for chunk in approximate:
        assert len(chunk.split()) * 1.3 <= 64 + 1e-9


def test_edge_cases(wordpiece: WordPieceCounter) -> None:
    assert split("", 32, 4, wordpiece) == []
    assert split("   \n\n  ", 32, 4, wordpiece) == []
    assert split("one short sentence.", 32, 4, wordpiece) == ["one short sentence."]
    giant = "xy," * 300  # one "word" of 600 tokens: cut into pieces of about a chunk (cuts may split a token)
    pieces = split(f"before {giant} after", 32, 0, wordpiece)
    assert len(pieces) > 10 and all(tokens(wordpiece, p) <= 34 for p in pieces)
    assert "".join(pieces).replace(" ", "") == f"before{giant}after"
    with pytest.raises(ValueError, match="overlap_tokens"):
        split(TEXT, 32, 32, wordpiece)


def test_wordpiece_counts_like_the_model_tokenizer(wordpiece: WordPieceCounter) -> None:
    assert tokens(wordpiece, "Zorvian festival,") == 5  # z ##or ##vian festival ,


def test_loaders_read_each_type(tmp_path: Path) -> None:
    text = load(tmp_path / "notes.txt", "\ufeffFirst   line\n\n\n\nSecond\tline\n".encode())
    assert text.title == "notes.txt" and text.text == "First line\n\nSecond line"
    markdown = load(tmp_path / "a.md", b"intro\n\n## The Title ##\n\nbody\n")
    assert markdown.title == "The Title" and "body" in markdown.text
    assert load(tmp_path / "b.markdown", b"Setext Title\n====\n\ntext").title == "Setext Title"
    assert load(tmp_path / "c.md", b"no heading").title == "c.md"
    html = load(
        tmp_path / "page.html",
        b"<html><head><title> Page  Title </title><style>p{}</style><script>var secret=1;</script></head>"
        b"<body><h1>Heading</h1><p>First <b>bold</b> paragraph.</p><p>Second.</p><noscript>no</noscript></body>",
    )
    assert html.title == "Page Title"
    assert html.text == "Heading\n\nFirst bold paragraph.\n\nSecond."
    assert load(tmp_path / "x.htm", b"<h1>Only  H1</h1><p>t</p>").title == "Only H1"
    pdf = load(tmp_path / "doc.pdf", pdf_bytes("PDF Title", ["Hello (PDF) world.", "Second paragraph."]))
    assert pdf.title == "PDF Title" and "Hello (PDF) world." in pdf.text and "Second paragraph." in pdf.text


def test_unreadable_and_unsupported(tmp_path: Path) -> None:
    with pytest.raises(UnreadableDocument, match="not a readable PDF"):
        load(tmp_path / "broken.pdf", b"%PDF-1.4 this is not a pdf")
    with pytest.raises(UnreadableDocument, match="no text layer"):
        load(tmp_path / "empty.pdf", pdf_bytes("t", []))
    with pytest.raises(UnreadableDocument, match="unsupported"):
        load(tmp_path / "data.csv", b"a,b")
    assert supported(Path("A.PDF")) and supported(Path("x.Markdown")) and not supported(Path("x.docx"))
