"""Raw text / JSONL -> megatron-core indexed datasets (``.bin``/``.idx``), one per split.

Input formats
-------------
* ``*.jsonl`` (optionally ``.gz``): one JSON object per line with a string ``text`` field; an
  ``id`` field, when present, is the document key used for splitting (else ``<file>:<line>``).
* any other file (``*.txt`` when a folder is scanned): one document per file, key = path relative
  to the folder given. With ``--txt-separator STR`` a line consisting of exactly ``STR`` (e.g.
  ``<|endoftext|>``) separates documents inside a file instead; keys are ``<file>#<n>``. Blank lines
  never separate documents, because code and prose contain them.

Bad input never stops a run: an empty file, a JSONL line that is not JSON or has no string
``text``, or an empty text is skipped with a :class:`DataWarning` naming the file and line.
Non-UTF-8 bytes are decoded with U+FFFD replacement characters and the document is *kept*
(dropping a whole file for one bad byte loses more than it protects); the warning names the file,
line and byte offset of the first bad byte. Only an input that yields no document at all is an
error (:class:`~megatron_btx.errors.BTXError`).

Each document becomes its token ids followed by EOS. Documents go to train/valid/test by a stable
hash of their key (:mod:`megatron_btx.data.splits`), so a document never straddles splits.
Outputs are ``<prefix>_{train,valid,test}_text_document.{bin,idx}``, written under temporary
names and renamed when complete.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy

from megatron_btx.data.splits import SPLITS, check_split_sizes, parse_split, split_of
from megatron_btx.data.tokenizer import load_tokenizer
from megatron_btx.data.tokenizer_base import Tokenizer
from megatron_btx.errors import BTXError
from megatron_btx.progress import note

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
TEXT_SUFFIXES = (".txt", ".text", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
MAX_WARNINGS_PER_FILE = 20


class DataWarning(UserWarning):
    """Bad input that was skipped or repaired; the message names the file and line."""


def split_prefix(prefix: str | os.PathLike[str], split: str) -> str:
    """Megatron path prefix of one split of a dataset, e.g. ``out/code_train_text_document``."""
    return f"{os.fspath(prefix)}_{split}_text_document"


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
@dataclass
class _FileReport:
    """Per-file warning budget, so a million bad lines give 20 warnings and a count."""

    path: str
    warned: int = 0
    suppressed: int = 0

    def warn(self, where: str, message: str) -> None:
        if self.warned < MAX_WARNINGS_PER_FILE:
            self.warned += 1
            warnings.warn(f"{where}: {message}", DataWarning, stacklevel=3)
        else:
            self.suppressed += 1

    def finish(self) -> int:
        if self.suppressed:
            warnings.warn(
                f"{self.path}: {self.suppressed} more problems of the same kind not shown",
                DataWarning,
                stacklevel=2,
            )
        return self.warned + self.suppressed


@dataclass
class ReadStats:
    """Counts gathered while reading, reported in the summary line and the manifest."""

    files: int = 0
    documents: int = 0
    skipped: int = 0
    problems: int = 0
    bytes: int = 0


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decode(raw: bytes, report: _FileReport, where: str, base_offset: int = 0) -> str:
    """UTF-8 decode; bad bytes become U+FFFD and one warning gives the first byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", errors="replace")
        report.warn(
            where,
            f"invalid UTF-8 at byte offset {base_offset + exc.start} of the (decompressed) "
            "file; bad bytes replaced with U+FFFD and the document kept",
        )
        return text


def _clean_surrogates(text: str, report: _FileReport, where: str) -> str:
    """JSON may carry lone surrogate escapes (\\ud800) that cannot be encoded; replace them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as exc:
        report.warn(where, f"lone surrogate at character {exc.start}; replaced with U+FFFD")
        return text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")


def read_jsonl(path: Path, rel: str, stats: ReadStats) -> Iterator[tuple[str, str]]:
    """Documents of a JSONL file; bad lines are warned about with ``file:line`` and skipped."""
    report = _FileReport(str(path))
    offset = 0
    any_line = False
    with _open_binary(path) as handle:
        for lineno, raw in enumerate(handle, start=1):
            line_offset, offset = offset, offset + len(raw)
            stats.bytes += len(raw)
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not documents
            any_line = True
            where = f"{path}:{lineno}"
            line = _decode(raw, report, where, line_offset)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                report.warn(where, f"invalid JSON ({exc.msg} at column {exc.colno}); line skipped")
                stats.skipped += 1
                continue
            except RecursionError:  # nested thousands deep: no document is
                report.warn(where, "JSON nested too deeply; line skipped")
                stats.skipped += 1
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                what = (
                    "has no 'text' field"
                    if not isinstance(record, dict) or "text" not in record
                    else (f"'text' is {type(text).__name__}, not a string")
                )
                report.warn(where, f"JSON object {what}; line skipped")
                stats.skipped += 1
                continue
            if not text.strip():
                report.warn(where, "empty 'text'; line skipped")
                stats.skipped += 1
                continue
            text = _clean_surrogates(text, report, where)
            doc_id = record.get("id")
            key = str(doc_id) if doc_id is not None and doc_id != "" else f"{rel}:{lineno}"
            stats.documents += 1
            yield key, text
    if not any_line:
        report.warn(str(path), "empty file; skipped")
    stats.problems += report.finish()


def read_text(
    path: Path, rel: str, stats: ReadStats, separator: str | None
) -> Iterator[tuple[str, str]]:
    """A text file as one document, or several split at lines equal to ``separator``."""
    report = _FileReport(str(path))
    with _open_binary(path) as handle:
        raw = handle.read()
    stats.bytes += len(raw)
    if not raw.strip():
        report.warn(str(path), "empty file; skipped")
        stats.skipped += 1
        stats.problems += report.finish()
        return
    if separator is None:
        stats.documents += 1
        yield rel, _decode(raw, report, str(path))
        stats.problems += report.finish()
        return
    # Split on separator lines, tracking line numbers and byte offsets for warnings.
    sep = separator.encode("utf-8")
    part: list[bytes] = []
    part_line, part_offset, offset, n = 1, 0, 0, 0
    lines = raw.splitlines(keepends=True)
    for lineno, line in enumerate(lines + [None], start=1):  # type: ignore[operator]
        if line is None or line.rstrip(b"\r\n") == sep:
            chunk = b"".join(part)
            if chunk.strip():
                n += 1
                stats.documents += 1
                yield f"{rel}#{n}", _decode(chunk, report, f"{path}:{part_line}", part_offset)
            elif part:
                report.warn(f"{path}:{part_line}", "empty document between separators; skipped")
                stats.skipped += 1
            if line is not None:
                offset += len(line)
            part, part_line, part_offset = [], lineno + 1, offset
            continue
        part.append(line)
        offset += len(line)
    stats.problems += report.finish()


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[tuple[Path, str]]:
    """Files to read with their key prefixes: a folder contributes its ``.txt``/``.jsonl`` files
    (recursively, sorted) keyed by relative path; a file is keyed by its name."""
    files: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)
            )
            if not found:
                warnings.warn(
                    f"{path}: folder has no .txt or .jsonl files; skipped",
                    DataWarning,
                    stacklevel=2,
                )
            files.extend((p, p.relative_to(path).as_posix()) for p in found)
        elif path.is_file():
            files.append((path, path.name))
        else:
            raise BTXError(f"input {path} does not exist; check the --input path")
    return files


def iter_documents(
    inputs: Sequence[str | os.PathLike[str]],
    stats: ReadStats | None = None,
    txt_separator: str | None = None,
) -> Iterator[tuple[str, str]]:
    """``(key, text)`` for every document of every input, in a stable order."""
    stats = stats if stats is not None else ReadStats()
    for path, rel in expand_inputs(inputs):
        stats.files += 1
        if path.name.endswith(JSONL_SUFFIXES):
            yield from read_jsonl(path, rel, stats)
        else:
            yield from read_text(path, rel, stats, txt_separator)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
class _SplitWriters:
    """One IndexedDatasetBuilder per split, writing to temporary names until :meth:`commit`."""

    def __init__(self, prefix: str, vocab_size: int) -> None:
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.prefix = prefix
        self.dtype = DType.optimal_dtype(vocab_size)
        self.tag = f".tmp{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.builders = {
            s: IndexedDatasetBuilder(split_prefix(prefix, s) + self.tag + ".bin", dtype=self.dtype)
            for s in SPLITS
        }
        self.documents = dict.fromkeys(SPLITS, 0)
        self.tokens = dict.fromkeys(SPLITS, 0)

    def add(self, split: str, ids: Sequence[int]) -> None:
        array = numpy.asarray(ids, dtype=self.dtype)
        self.builders[split].add_document(array, [array.size])
        self.documents[split] += 1
        self.tokens[split] += int(array.size)

    def commit(self) -> dict[str, str]:
        paths = {}
        for s, builder in self.builders.items():
            final = split_prefix(self.prefix, s)
            builder.finalize(final + self.tag + ".idx")
            os.replace(final + self.tag + ".bin", final + ".bin")
            os.replace(final + self.tag + ".idx", final + ".idx")
            paths[s] = final
        return paths

    def abort(self) -> None:
        for s, builder in self.builders.items():
            builder.data_file.close()
            for ext in (".bin", ".idx"):
                try:
                    os.remove(split_prefix(self.prefix, s) + self.tag + ext)
                except FileNotFoundError:
                    pass


def _batches(
    docs: Iterable[tuple[str, str]], max_docs: int = 256, max_chars: int = 4_000_000
) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[1])
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def preprocess_files(
    inputs: Sequence[str | os.PathLike[str]],
    output_prefix: str | os.PathLike[str],
    tokenizer: Tokenizer | str | os.PathLike[str],
    split: str | Mapping[str, float] | None = None,
    workers: int = 1,
    txt_separator: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Tokenise ``inputs`` into ``<output_prefix>_{train,valid,test}_text_document``.

    ``workers`` is the number of SentencePiece encoding threads (reading and JSON parsing stay in
    one thread; tokenisation dominates). Returns per-split document and token counts (tokens
    include the EOS appended to each document). Raises BTXError if no document was found.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    fractions = parse_split(dict(split) if isinstance(split, Mapping) else split)
    prefix = os.fspath(output_prefix)
    label = name or os.path.basename(prefix)
    stats = ReadStats()
    writers = _SplitWriters(prefix, tok.vocab_size)
    started = last_report = time.time()
    eos = tok.eos_id
    try:
        for batch in _batches(iter_documents(inputs, stats, txt_separator)):
            encoded = tok.encode_batch([text for _, text in batch], num_threads=max(1, workers))
            for (key, _), ids in zip(batch, encoded, strict=True):
                ids.append(eos)
                writers.add(split_of(key, fractions), ids)
            now = time.time()
            if now - last_report > 5:
                last_report = now
                done = sum(writers.documents.values())
                note(
                    f"{label}: {done} docs, {sum(writers.tokens.values()) / 1e6:.2f}M tokens, "
                    f"{stats.bytes / 1e6 / (now - started):.1f} MB/s"
                )
        if sum(writers.documents.values()) == 0:
            raise BTXError(
                f"no documents found in {', '.join(map(str, inputs))} ({stats.files} files read, "
                f"{stats.skipped} skipped); give .txt files (one document each) or .jsonl with a "
                "'text' field per line"
            )
        check_split_sizes(label, writers.documents, fractions)  # before anything is committed
        paths = writers.commit()
    except BaseException:
        writers.abort()
        raise
    seconds = time.time() - started
    note(
        f"{label}: {stats.documents} docs ({stats.skipped} skipped, {stats.problems} problems) -> "
        + ", ".join(f"{s} {writers.documents[s]} docs/{writers.tokens[s]} tok" for s in SPLITS)
        + f" in {seconds:.1f}s"
    )
    return {
        "prefixes": paths,
        "documents": dict(writers.documents),
        "tokens": dict(writers.tokens),
        "files": stats.files,
        "skipped": stats.skipped,
        "problems": stats.problems,
        "input_bytes": stats.bytes,
        "seconds": round(seconds, 2),
    }


# ---------------------------------------------------------------------------------------------
# The manifest of a prepared folder (written by megatron_btx.data.domains.prepare_domains)
# ---------------------------------------------------------------------------------------------
def load_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``out_dir/manifest.json``; BTXError with the fix if it is missing or corrupt."""
    path = Path(out_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BTXError(
            f"{path} not found; run `btx prepare-data --output-dir {out_dir} ...` first"
        ) from None
    except json.JSONDecodeError as exc:
        raise BTXError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); re-run `btx prepare-data`"
        ) from None
