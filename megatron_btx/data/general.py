"""The ``general`` built-in domain: public-domain English books, one document per chapter.

The paper's seed was pretrained on general text, and its experts specialise where the seed is
weak. Here the general domain is narrative English that none of the expert domains (code, formal
mathematics, dictionary entries, licences) specialises in, from Debian packages:

- Jane Austen's six novels (``r-cran-janeaustenr``, R data; MIT-licensed package of
  public-domain texts), 4.0 MB;
- Herman Melville's *Moby Dick* (``r-cran-tokenizers``, R data; Project Gutenberg #2701 without
  its licence header and footer), 1.2 MB;
- the World English Bible with Deuterocanon (``sword-text-web``, a SWORD zText module; public
  domain, modern English), 5.0 MB once its OSIS markup and footnotes are removed.

Chapters are the documents: natural units of a book, a few thousand tokens each, and numerous
enough (about 1,800) that a few percent held out is dozens of whole chapters. Keys are
``austen/<book>/<nnn>``, ``melville/mobydick/<nnn>`` and ``web/<OSIS id>`` (``web/Gen.1``).
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from megatron_btx.data.fetch import Document, fetch_debian_file
from megatron_btx.data.rdata import read_lazyload
from megatron_btx.errors import BTXError

_DEB_AUSTEN = ("r-cran-janeaustenr", "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
_DEB_TOKENIZERS = ("r-cran-tokenizers", "usr/lib/R/site-library/tokenizers/data/Rdata.rdb")
_WEB_DIR = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
_DEB_WEB = ("sword-text-web", f"{_WEB_DIR}/nt.bzz")
# The Greek Esther and Daniel repeat most of the Hebrew books' text (and the module's
# versification folds them into the same verse slots): kept out so no text occurs twice.
_WEB_SKIP_BOOKS = frozenset({"EsthGr", "DanGr"})
_MAX_BLOCK = 1 << 28  # 256 MiB: no book of the Bible is near this once decompressed


# Chapter headings of the novels ("CHAPTER I", "Chapter 12", "CHAPTER 1. Loomings.", "Epilogue");
# a "VOLUME II" banner right before a chapter heading opens that chapter's document.
_CHAPTER = re.compile(
    r"^\s*(?:(?:CHAPTER|Chapter)\s+(?:[0-9]+|[IVXLC]+)\b|(?:Epilogue|EPILOGUE)\s*$)"
)
_SHORT_FRONT_MATTER = 1000  # characters; a shorter front matter is a title page
_VOLUME = re.compile(r"^\s*VOLUME\s+[IVXLC]+\s*$")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (?:THIS|THE) PROJECT GUTENBERG", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^(?:End of (?:the )?Project Gutenberg|\*\*\* ?END OF)", re.MULTILINE)


def split_chapters(book: str, lines: list[str]) -> Iterator[Document]:
    """Cut a book (a list of lines) into chapters; key ``<book>/<nnn>``, ``000`` = front matter.

    Chapters are the natural documents of a novel: big enough to hold long-range context, and
    numerous enough (about 50 per book) that a 2% held-out split has whole chapters in it.
    """
    starts: list[int] = []
    last_text = -1  # index of the last non-blank line seen
    for i, line in enumerate(lines):
        if _CHAPTER.match(line):
            volume_first = last_text >= 0 and _VOLUME.match(lines[last_text])
            starts.append(last_text if volume_first and last_text > (starts or [-1])[-1] else i)
        if line.strip():
            last_text = i
    bounds = [0, *starts, len(lines)]
    first = 0
    if starts and len("".join(lines[: starts[0]]).strip()) < _SHORT_FRONT_MATTER:
        first = 1  # a title page alone is no document: it opens chapter 1 instead
        bounds.pop(1)
    for number in range(first, first + len(bounds) - 1):
        text = "\n".join(lines[bounds[number - first] : bounds[number - first + 1]]).strip("\n")
        if text.strip():
            yield f"{book}/{number:03d}", text + "\n"


def _gutenberg_body(text: str) -> str:
    """The book inside a Project Gutenberg file, without its licence header and footer."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[text.index("\n", start.end()) + 1 :]
    end = _GUTENBERG_END.search(text)
    return text[: end.start()] if end else text


def iter_novel_documents(cache_dir: Path | None = None) -> Iterator[Document]:
    """Jane Austen's six novels and *Moby Dick*, one document per chapter."""
    austen = read_lazyload(fetch_debian_file(*_DEB_AUSTEN, cache_dir=cache_dir))
    for book in sorted(austen):
        lines = [line if isinstance(line, str) else "" for line in austen[book]]
        yield from split_chapters(f"austen/{book}", lines)
    tokenizers_data = read_lazyload(fetch_debian_file(*_DEB_TOKENIZERS, cache_dir=cache_dir))
    moby = tokenizers_data.get("mobydick")
    if not moby or not isinstance(moby[0], str):
        raise BTXError(f"{_DEB_TOKENIZERS[0]}: no 'mobydick' text in its R data")
    yield from split_chapters("melville/mobydick", _gutenberg_body(moby[0]).split("\n"))


def read_ztext(module_dir: str | Path, testament: str) -> str:
    """The OSIS text of one testament (``ot``/``nt``) of a SWORD zText module, verse by verse in
    canonical order, verses separated by a space.

    ``<t>.bzs`` lists the compressed blocks (little-endian offset, size, uncompressed size; 12
    bytes each) of ``<t>.bzz`` (zlib, one book per block); ``<t>.bzv`` gives every verse slot
    as (block, offset, size; 10 bytes) in the decompressed block.
    """
    folder = Path(module_dir)
    try:
        block_index = (folder / f"{testament}.bzs").read_bytes()
        verse_index = (folder / f"{testament}.bzv").read_bytes()
        data = (folder / f"{testament}.bzz").read_bytes()
    except OSError as exc:
        raise BTXError(f"cannot read the SWORD module in {folder}: {exc}") from exc
    if len(block_index) % 12 or len(verse_index) % 10:
        raise BTXError(f"{folder}: {testament}.bzs/.bzv sizes are not whole index entries")
    blocks = []
    for offset, size, plain in struct.iter_unpack("<III", block_index):
        if offset + size > len(data) or plain > _MAX_BLOCK:
            raise BTXError(f"{folder}/{testament}.bzs: a block points outside the data file")
        try:
            blocks.append(zlib.decompressobj().decompress(data[offset : offset + size], plain + 1))
        except zlib.error as exc:
            raise BTXError(f"{folder}/{testament}.bzz: corrupt block ({exc})") from exc
    verses = []
    for block, start, size in struct.iter_unpack("<IIH", verse_index):
        if not size:
            continue
        if block >= len(blocks) or start + size > len(blocks[block]):
            raise BTXError(f"{folder}/{testament}.bzv: a verse points outside its block")
        verses.append(blocks[block][start : start + size].decode("utf-8", errors="replace"))
    return " ".join(verses)


_OSIS_CHAPTER = re.compile(
    r'<chapter\b[^>]*\bsID="([^"]+)"[^>]*/>(.*?)<chapter\b[^>]*\beID="\1"', re.S
)
_OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_OSIS_LINE_END = re.compile(r'<(?:l|lg)\b[^>]*\beID="[^"]*"[^>]*/>|<lb\b[^>]*/>')
_OSIS_PARAGRAPH_END = re.compile(
    r'<div\b[^>]*\beID="[^"]*"[^>]*type="x-p"[^>]*/>|<div\b[^>]*type="x-p"[^>]*\beID="[^"]*"[^>]*/>'
)
_OSIS_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.S)
_OSIS_TAG = re.compile(r"<[^>]*>")


def osis_chapters(osis: str) -> Iterator[tuple[str, str]]:
    """``(osis_id, plain text)`` of every chapter: footnotes dropped, titles, poetry lines and
    paragraphs kept as lines, every other tag removed, entities decoded."""
    for match in _OSIS_CHAPTER.finditer(osis):
        # A footnote often sits between two words with no space around it ("God<note/>created").
        body = _OSIS_NOTE.sub("\x00", match.group(2))
        body = _OSIS_TITLE.sub(lambda m: "\n" + m.group(1) + "\n\n", body)
        body = _OSIS_PARAGRAPH_END.sub("\n\n", body)
        body = _OSIS_LINE_END.sub("\n", body)
        body = html.unescape(_OSIS_TAG.sub("", body))
        body = re.sub(r"(?<=\w)\x00(?=\w)", " ", body).replace("\x00", "")
        lines = [" ".join(line.split()) for line in body.split("\n")]
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
        if text:
            yield match.group(1), text


def iter_bible_documents(cache_dir: Path | None = None) -> Iterator[Document]:
    """The World English Bible (with Deuterocanon), one document per chapter (key ``web/Gen.1``),
    headed by its reference (``Gen 1``)."""
    module_dir = fetch_debian_file(*_DEB_WEB, cache_dir=cache_dir).parent
    for testament in ("ot", "nt"):
        for osis_id, text in osis_chapters(read_ztext(module_dir, testament)):
            if osis_id.split(".")[0] in _WEB_SKIP_BOOKS:
                continue
            yield f"web/{osis_id}", f"{osis_id.replace('.', ' ')}\n\n{text}\n"


def iter_general_documents(cache_dir: Path | None = None) -> Iterator[Document]:
    """Every document of the ``general`` domain: the novels, then the Bible."""
    yield from iter_novel_documents(cache_dir)
    yield from iter_bible_documents(cache_dir)
