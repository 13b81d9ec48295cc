"""`sluice ingest`: load, chunk, embed and store documents in a RAG collection (sluice/rag/ingest.py).

    sluice ingest --config FILE --collection NAME PATH... [--delete-missing] [--json]

Uses `rag.chroma`, `rag.embedder`, `rag.chunk_tokens` and `rag.overlap_tokens` from FILE. Progress goes to
stderr (a bar on a terminal, a line per tenth of the files otherwise), the summary to stdout (`--json`: one
JSON document). Exit codes (sluice/cli_common.py): 0 done (files skipped with a warning included), 1 Chroma
or the embedder failed, 2 wrong usage or configuration (a missing path, an embedder mismatch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from sluice.cache.embedders import make_embedder
from sluice.cache.types import EmbedderUnavailable
from sluice.cli_common import UsageError, common_options, run_command
from sluice.config import SluiceConfig
from sluice.engine.progress import format_seconds
from sluice.rag.chroma import make_chunk_store
from sluice.rag.chroma_writer import EmbedderMismatch
from sluice.rag.ingest import IngestError, IngestSummary, ingest
from sluice.rag.types import RetrievalUnavailable

EMBED_TIMEOUT = 300.0  # per embedding call while ingesting: throughput matters here, not latency
BAR_WIDTH = 30


def main(argv: list[str]) -> int:
    """`sluice ingest ...` (the arguments after `ingest`)."""
    args = _parser().parse_args(argv)
    return run_command(
        "sluice ingest",
        lambda config: _ingest(args, config),
        args.config,
        usage_errors=(IngestError, EmbedderMismatch),
        failures=(RetrievalUnavailable, EmbedderUnavailable),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice ingest",
        parents=[common_options()],
        description="Store documents (.txt, .md, .html, .pdf) as embedded chunks in a RAG collection.",
    )
    parser.add_argument("--collection", required=True, metavar="NAME", help="the collection (3-63 characters)")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (read recursively)")
    parser.add_argument(
        "--delete-missing", action="store_true", help="delete the chunks of sources no longer found under PATH"
    )
    return parser


class ProgressBar:
    """Files and chunks on stderr: redrawn in place on a terminal, a line per tenth of the files otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._live = self._stream.isatty()
        self._last_tenth = -1
        self._drawn = False

    def warn(self, message: str) -> None:
        self._clear()
        self._stream.write(f"warning: {message}\n")
        self._stream.flush()

    def progress(self, files_done: int, files_total: int, chunks: int) -> None:
        share = files_done / files_total if files_total else 1.0
        line = f"{files_done}/{files_total} files, {chunks} chunks"
        if self._live:
            filled = round(share * BAR_WIDTH)
            self._stream.write(f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {line}")
            self._drawn = True
        elif int(share * 10) > self._last_tenth:
            self._last_tenth = int(share * 10)
            self._stream.write(f"{line}\n")
        self._stream.flush()

    def end(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._drawn = False

    def _clear(self) -> None:
        if self._drawn:
            self._stream.write("\r\033[K")


async def _ingest(args: argparse.Namespace, config: SluiceConfig) -> None:
    if not 3 <= len(args.collection) <= 63:
        raise UsageError("--collection must be 3 to 63 characters")
    rag = config.rag
    store = make_chunk_store(rag.chroma)
    embedder = make_embedder(rag.embedder.model_copy(update={"timeout": max(rag.embedder.timeout, EMBED_TIMEOUT)}))
    bar = ProgressBar()
    try:
        summary = await ingest(
            rag,
            args.collection,
            [Path(p) for p in args.paths],
            store,
            embedder,
            delete_missing=args.delete_missing,
            reporter=bar,
        )
    except RetrievalUnavailable as err:
        where = "rag.chroma.url" if rag.chroma.mode == "http" else "rag.chroma.path"
        raise RetrievalUnavailable(f"{err}\n(is Chroma running, and is {where} right?)") from None
    finally:
        bar.end()
        await embedder.close()
        await store.close()
    print(json.dumps(summary.document(), indent=2) if args.json else _text(summary))


def _text(summary: IngestSummary) -> str:
    version = f"version {summary.version}" if summary.version is not None else "version unchanged"
    lines = [
        f"Collection {summary.collection}: {version}",
        f"  files: {summary.added} added, {summary.changed} changed, {summary.unchanged} unchanged, "
        f"{summary.deleted} deleted",
    ]
    if summary.skipped or summary.unreadable or summary.duplicates:
        lines.append(
            f"  skipped: {summary.skipped} unsupported, {summary.unreadable} unreadable, "
            f"{summary.duplicates} duplicates"
        )
    lines.append(
        f"  chunks written: {summary.chunks_written} in {format_seconds(summary.seconds)} "
        f"({summary.chunks_per_second:.1f} chunks/s after {format_seconds(summary.warm_up_seconds)} warm-up)"
    )
    return "\n".join(lines)
