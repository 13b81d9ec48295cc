"""Reading documents for ingestion: text, Markdown, HTML and PDF files into a title and plain text.

`load(path, data)` picks the reader by extension; `LOADERS` lists the extensions read (others are skipped
by the caller). A file that cannot be read raises `UnreadableDocument` with a reason the user can act on.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bs4 import BeautifulSoup

BLANK_LINES = re.compile(r"\n\s*\n\s*")
SPACES = re.compile(r"[ \t\f\v\r]+")
MD_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
MD_SETEXT = re.compile(r"^(\S[^\n]*)\n=+\s*$", re.MULTILINE)
HTML_DROP = ("script", "style", "noscript", "template", "svg")
HTML_BLOCKS = (
    "p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote",
    "section", "article", "header", "footer", "table", "ul", "ol", "dd", "dt", "hr",
)  # fmt: skip


class UnreadableDocument(Exception):
    """The file could not be read as its extension says (a broken or encrypted PDF, no text in it...)."""


@dataclass(frozen=True, slots=True)
class Document:
    title: str
    text: str


def decode(data: bytes) -> str:
    return data.decode("utf-8-sig", errors="replace")


def tidy(text: str) -> str:
    """Spaces collapsed within lines, runs of blank lines kept as one paragraph break."""
    lines = (SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def load_text(path: Path, data: bytes) -> Document:
    return Document(path.name, tidy(decode(data)))


def load_markdown(path: Path, data: bytes) -> Document:
    text = decode(data)
    atx, setext = MD_HEADING.search(text), MD_SETEXT.search(text)
    heading = min((m for m in (atx, setext) if m is not None), key=lambda m: m.start(), default=None)
    title = heading.group(1).strip() if heading is not None else path.name
    return Document(title or path.name, tidy(text))


def load_html(path: Path, data: bytes) -> Document:
    soup = BeautifulSoup(data, "html.parser")
    for tag in soup.find_all(HTML_DROP):
        tag.decompose()
    title = ""
    if soup.title is not None:
        title = " ".join(soup.title.get_text().split())
        soup.title.decompose()
    if not title:
        h1 = soup.find("h1")
        title = " ".join(h1.get_text().split()) if h1 is not None else ""
    for block in soup.find_all(HTML_BLOCKS):
        block.insert_after("\n\n")  # block elements end a paragraph; inline ones flow on
    return Document(title or path.name, tidy(soup.get_text()))


def load_pdf(path: Path, data: bytes) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableDocument("the PDF is encrypted: decrypt it first (e.g. qpdf --decrypt)")
        pages = [page.extract_text() or "" for page in reader.pages]
        info = reader.metadata
        title = str(info.title).strip() if info is not None and info.title else ""
    # pypdf reports malformed files with its own errors but also, from deep in its parser, with the plain
    # ones listed here; any of them means "this PDF cannot be read", which the caller reports and skips.
    except (PyPdfError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        raise UnreadableDocument(f"not a readable PDF ({type(err).__name__}: {err})") from None
    text = "\n\n".join(tidy(page) for page in pages if page.strip())
    if not text:
        raise UnreadableDocument("the PDF has no text layer (a scan?): run OCR on it first (e.g. ocrmypdf)")
    return Document(title or path.name, text)


LOADERS: dict[str, Callable[[Path, bytes], Document]] = {
    ".txt": load_text,
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".html": load_html,
    ".htm": load_html,
    ".pdf": load_pdf,
}


def supported(path: Path) -> bool:
    return path.suffix.lower() in LOADERS


def load(path: Path, data: bytes) -> Document:
    """The title and text of the file at `path` whose bytes are `data`; raises UnreadableDocument."""
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise UnreadableDocument(f"unsupported file type {path.suffix!r}")
    return loader(path, data)
