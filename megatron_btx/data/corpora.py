"""The built-in domains for the small BTX run, from real text reachable with package clients.

No model or data hub is reachable, so each domain comes from a package (see
docs/OFFLINE_DATA.md): ``code`` is the Python standard library on this machine, ``math`` is
Metamath's set.mm (Debian ``metamath-databases``), ``prose`` is the GCIDE dictionary (Debian
``dict-gcide``), ``legal`` is the licence texts inside the ``scancode-toolkit`` wheel (PyPI), and
``general`` (the seed's pretraining text, which no expert specialises in) is public-domain books
by chapter: Jane Austen's six novels, *Moby Dick* and the World English Bible (Debian
``r-cran-janeaustenr``, ``r-cran-tokenizers``, ``sword-text-web``; :mod:`.general`). Debian
packages are unpacked with ``apt-get download`` + ``dpkg-deb -x`` (nothing is installed) and the
wheel is read with ``zipfile``; both are cached under ``$BTX_DATA_CACHE``, else the user cache
directory (:mod:`megatron_btx.cache`).

Each domain yields ``(key, text)`` documents. The key names the unit of splitting (module path,
set.mm section, headword group, licence key, book chapter) so that
:func:`megatron_btx.data.splits.split_of` keeps whole documents in one split.
:func:`fetch_corpora` writes one ``<domain>.jsonl`` per domain (``{"text": ..., "id": key}``)
capped at ``max_mb``; when a domain is larger than the cap a hash-ordered (hence representative
and stable) subset of documents is kept, and a bigger cap always keeps a superset of a smaller one.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import sys
import sysconfig
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from megatron_btx.data.fetch import (
    Document,
    default_cache_dir,
    fetch_debian_file,
    fetch_wheel,
)
from megatron_btx.data.general import iter_general_documents as read_general
from megatron_btx.data.splits import SPLITS, key_fraction, parse_split, split_of
from megatron_btx.errors import BTXError
from megatron_btx.progress import note

logger = logging.getLogger(__name__)

EXPERT_DOMAINS: tuple[str, ...] = ("code", "math", "prose", "legal")
# ``general`` is the seed's pretraining text, which no expert specialises in (paper: the seed's
# general data, 19% of the MoE finetune blend).
DOMAINS: tuple[str, ...] = (*EXPERT_DOMAINS, "general")
FORMAT_VERSION = 2  # bump when the extraction of any domain changes, to invalidate old outputs

SCANCODE_REQUIREMENT = "scancode-toolkit==32.5.0"
SCANCODE_WHEEL_GLOB = "scancode_toolkit-32.5.0-*.whl"
_DEB_METAMATH = ("metamath-databases", "usr/share/metamath/databases/set.mm")
_DEB_GCIDE = ("dict-gcide", "usr/share/dictd/gcide.dict.dz")


# ---------------------------------------------------------------------------------------------
# Domain readers
# ---------------------------------------------------------------------------------------------
_CODE_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "pydoc_data",  # one generated 700 kB file of help text, not code
}


def iter_code_documents(stdlib: str | None = None) -> Iterator[Document]:
    """Python standard library modules, one document per ``.py`` file (key: path in stdlib).

    Test folders and ``test_*.py`` are skipped (mostly repetitive assertions), as are
    site-packages (third-party code with other licences).
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise BTXError(f"Python stdlib folder {root} not found; pass stdlib=<path to Lib/>")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _CODE_SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = Path(dirpath) / name
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # a handful of stdlib files use legacy encodings on purpose
            if text.strip():
                yield f"python-stdlib/{path.relative_to(root).as_posix()}", text


_MM_KEYWORD = re.compile(r"(?<!\S)(\$\(|\$\)|\$=|\$\.)(?!\S)")
# Part/chapter/section banners; subsections (-.-.) stay inside their section's document.
_MM_HEADER = re.compile(
    r"^\$\([ \t]*\n(?P<bar>(?:#{20,}|(?:#\*){10,}#?|(?:=-){10,}=?))[ \t]*\n(?P<title>[^$]*?)\n(?P=bar)",
    re.MULTILINE | re.DOTALL,
)


def strip_metamath_proofs(text: str) -> str:
    """Replace every ``$= ... $.`` proof with ``$= ? $.`` (Metamath's "proof unknown").

    Compressed proofs are base-26 noise to a language model and are 60% of set.mm; the result
    stays valid Metamath syntax. Keywords inside comments are ignored.
    """
    out: list[str] = []
    pos = 0
    in_comment = False
    proof_start = -1
    for match in _MM_KEYWORD.finditer(text):
        tok = match.group(1)
        if in_comment:
            if tok == "$)":
                in_comment = False
            continue
        if proof_start >= 0:
            if tok == "$.":
                out.append(text[pos:proof_start])
                out.append("$= ? $.")
                pos = match.end()
                proof_start = -1
            continue
        if tok == "$(":
            in_comment = True
        elif tok == "$=":
            proof_start = match.start()
    out.append(text[pos:])
    return "".join(out)


def split_metamath_sections(text: str, source: str = "set.mm") -> Iterator[Document]:
    """Cut a .mm file at part/chapter/section banners; key ``set.mm/<title>`` (+ ``~n`` if repeated)."""
    starts = [m.start() for m in _MM_HEADER.finditer(text)]
    titles = [" ".join(m.group("title").split()) for m in _MM_HEADER.finditer(text)]
    bounds = [0, *starts, len(text)]
    names = ["(preamble)", *titles]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        chunk = text[bounds[i] : bounds[i + 1]]
        if not chunk.strip():
            continue
        seen[name] = seen.get(name, 0) + 1
        suffix = f"~{seen[name]}" if seen[name] > 1 else ""
        yield f"{source}/{name}{suffix}", chunk.strip("\n") + "\n"


def iter_math_documents(cache_dir: Path | None = None) -> Iterator[Document]:
    """Metamath set.mm sections with compressed proofs stripped (CC0)."""
    path = fetch_debian_file(*_DEB_METAMATH, cache_dir=cache_dir)
    text = path.read_bytes().decode("utf-8", errors="replace")
    yield from split_metamath_sections(strip_metamath_proofs(text), source="set.mm")


_B64 = {
    c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}


def _dictd_number(s: str) -> int:
    """dictd index offsets/lengths are base64 numbers, most significant digit first."""
    value = 0
    for ch in s:
        value = value * 64 + _B64[ch]
    return value


def _headword_norm(word: str) -> str:
    return re.sub(r"[^a-z0-9]", "", word.lower()) or "_"


def group_by_prefix(
    entries: list[tuple[str, str]], max_chars: int, depth: int = 1, prefix: str = ""
) -> Iterator[tuple[str, list[str]]]:
    """Group (normalised headword, text) entries by headword prefix, lengthening the prefix
    until each group is at most ``max_chars``; related words (abandon, abandoned, ...) stay together
    so they never straddle train and test."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for norm, text in entries:
        groups.setdefault(norm[:depth], []).append((norm, text))
    for key in sorted(groups):
        members = groups[key]
        size = sum(len(t) for _, t in members)
        if (
            size <= max_chars
            or depth >= 12
            or len(members) == 1
            or all(len(n) <= depth for n, _ in members)
        ):
            yield key, [t for _, t in members]
        else:
            yield from group_by_prefix(members, max_chars, depth + 1, key)


def iter_prose_documents(
    cache_dir: Path | None = None, group_chars: int = 24_000
) -> Iterator[Document]:
    """GCIDE (1913 Webster + successors) entries grouped by headword prefix (GPL-2+)."""
    dz = fetch_debian_file(*_DEB_GCIDE, cache_dir=cache_dir)
    index = dz.with_name("gcide.index")
    data = gzip.decompress(dz.read_bytes())  # dictzip is gzip-compatible
    spans: dict[int, tuple[int, str]] = {}
    if index.is_file():
        for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) != 3 or parts[0].startswith("00-"):
                continue
            try:
                off, length = _dictd_number(parts[1]), _dictd_number(parts[2])
            except KeyError:
                continue
            spans.setdefault(off, (length, parts[0]))
    else:  # no index: entries start at an unindented line after a blank line
        for m in re.finditer(rb"(?:^|\n\n)([^\s][^\n]*)", data):
            spans.setdefault(m.start(1), (0, m.group(1).decode("utf-8", "replace").split(" ")[0]))
    entries: list[tuple[str, str]] = []
    offsets = sorted(spans)
    for i, off in enumerate(offsets):
        length, head = spans[off]
        end = off + length if length else (offsets[i + 1] if i + 1 < len(offsets) else len(data))
        text = data[off:end].decode("utf-8", errors="replace").strip("\n")
        if text.strip():
            # Group by the headword printed at the top of the entry ("Sleeve \Sleeve\, n."):
            # the index also lists phrases ("a McIntire joint") that point into other entries.
            first = text.lstrip().split("\n", 1)[0]
            printed = re.match(r"([^\\]+?)\s*\\", first)
            entries.append((_headword_norm(printed.group(1) if printed else head), text))
    for prefix, texts in group_by_prefix(entries, group_chars):
        yield f"gcide/{prefix}", "\n\n".join(texts) + "\n"


_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n---[ \t]*(?:\n|\Z)", re.DOTALL)


def iter_legal_documents(cache_dir: Path | None = None) -> Iterator[Document]:
    """Licence texts from scancode-toolkit's licence database; front matter and deprecated
    licences dropped (key: scancode licence key)."""
    wheel = fetch_wheel(SCANCODE_REQUIREMENT, SCANCODE_WHEEL_GLOB, cache_dir=cache_dir)
    prefix = "licensedcode/data/licenses/"
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise BTXError(f"{wheel} is not a valid wheel ({exc}); delete it and fetch again") from exc
    with archive:
        for name in sorted(archive.namelist()):
            if not (name.startswith(prefix) and name.endswith(".LICENSE")):
                continue
            raw = archive.read(name).decode("utf-8", errors="replace")
            match = _FRONT_MATTER.match(raw)
            meta, body = (match.group(1), raw[match.end() :]) if match else ("", raw)
            if re.search(r"^is_deprecated:\s*(yes|true)\s*$", meta, re.MULTILINE | re.IGNORECASE):
                continue
            body = body.strip("\n")
            if body.strip():
                yield f"scancode-license/{name[len(prefix) : -len('.LICENSE')]}", body + "\n"


def iter_general_documents(cache_dir: Path | None = None) -> Iterator[Document]:
    """Public-domain novels and the World English Bible by chapter (:mod:`.general`)."""
    return read_general(cache_dir)


READERS: dict[str, Callable[..., Iterator[Document]]] = {
    "code": lambda cache_dir=None: iter_code_documents(),
    "math": iter_math_documents,
    "prose": iter_prose_documents,
    "legal": iter_legal_documents,
    "general": iter_general_documents,
}
SOURCES: dict[str, str] = {
    "code": f"python {sys.version_info.major}.{sys.version_info.minor} stdlib",
    "math": "debian:metamath-databases set.mm (CC0)",
    "prose": "debian:dict-gcide (GPL-2+)",
    "legal": f"pypi:{SCANCODE_REQUIREMENT} licensedcode/data/licenses (various licences)",
    "general": "debian:r-cran-janeaustenr, r-cran-tokenizers, sword-text-web (public domain)",
}


def iter_domain_documents(domain: str, cache_dir: Path | None = None) -> Iterator[Document]:
    """All documents of a built-in domain, in a stable order."""
    if domain not in READERS:
        raise BTXError(f"unknown built-in domain {domain!r}; choose from {', '.join(DOMAINS)}")
    return READERS[domain](cache_dir=cache_dir)


def select_documents(
    docs: Iterable[Document], max_bytes: int | None
) -> tuple[list[Document], int, int]:
    """Keep a hash-ordered subset of at most ``max_bytes`` (UTF-8) in original order.

    Returns (kept, total_docs, total_bytes). The first document in hash order is always kept,
    even if it alone exceeds the cap, so a domain is never empty.
    """
    all_docs = list(docs)
    sizes = [len(text.encode("utf-8", "surrogatepass")) for _, text in all_docs]
    total = sum(sizes)
    if max_bytes is None or total <= max_bytes:
        return all_docs, len(all_docs), total
    order = sorted(range(len(all_docs)), key=lambda i: key_fraction(all_docs[i][0], salt="select"))
    chosen: set[int] = set()
    used = 0
    for i in order:
        if used + sizes[i] > max_bytes and chosen:
            continue  # try smaller documents further down the order
        chosen.add(i)
        used += sizes[i]
        if used >= max_bytes * 0.995:
            break
    return [all_docs[i] for i in sorted(chosen)], len(all_docs), total


def _write_jsonl_atomic(path: Path, docs: Iterable[Document], domain: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        for key, text in docs:
            handle.write(
                json.dumps({"text": text, "id": key, "domain": domain}, ensure_ascii=False)
            )
            handle.write("\n")
    os.replace(tmp, path)


def fetch_domain(
    domain: str,
    out_dir: str | os.PathLike[str],
    max_mb: float | None = 4.0,
    cache_dir: str | os.PathLike[str] | None = None,
    split: str | dict[str, float] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``<out_dir>/<domain>.jsonl`` (+ ``.meta.json``) unless it exists with the same settings.

    Returns the metadata: source, document/byte counts before and after the cap, and the
    documents per split that :func:`split_of` will assign with ``split`` fractions.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fractions = parse_split(split)
    jsonl, meta_path = out / f"{domain}.jsonl", out / f"{domain}.meta.json"
    settings = {
        "format": FORMAT_VERSION,
        "domain": domain,
        "max_mb": max_mb,
        "source": SOURCES.get(domain),
    }
    if not force and jsonl.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("settings") == settings and meta.get("bytes_written") == jsonl.stat().st_size:
            note(
                f"{domain}: up to date ({meta['documents']} docs, {meta['bytes'] / 1e6:.1f} MB) {jsonl}"
            )
            return meta
    started = time.time()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    note(f"{domain}: reading {SOURCES.get(domain, domain)} ...")
    max_bytes = None if max_mb is None or max_mb <= 0 else int(max_mb * 1e6)
    kept, total_docs, total_bytes = select_documents(
        iter_domain_documents(domain, cache), max_bytes
    )
    if not kept:
        raise BTXError(f"built-in domain {domain} produced no documents from {SOURCES.get(domain)}")
    _write_jsonl_atomic(jsonl, kept, domain)
    per_split = dict.fromkeys(SPLITS, 0)
    for key, _ in kept:
        per_split[split_of(key, fractions)] += 1
    meta = {
        "settings": settings,
        "path": str(jsonl),
        "documents": len(kept),
        "bytes": sum(len(t.encode("utf-8", "surrogatepass")) for _, t in kept),
        "bytes_written": jsonl.stat().st_size,
        "source_documents": total_docs,
        "source_bytes": total_bytes,
        "split_fractions": fractions,
        "documents_per_split": per_split,
        "seconds": round(time.time() - started, 2),
    }
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)
    note(
        f"{domain}: kept {len(kept)}/{total_docs} docs, {meta['bytes'] / 1e6:.1f}/{total_bytes / 1e6:.1f} MB "
        f"(train {per_split['train']} / valid {per_split['valid']} / test {per_split['test']}) "
        f"in {meta['seconds']:.1f}s -> {jsonl}"
    )
    return meta


def fetch_corpora(
    domains: Iterable[str] = DOMAINS,
    out_dir: str | os.PathLike[str] | None = None,
    max_mb: float | None = 4.0,
    cache_dir: str | os.PathLike[str] | None = None,
    split: str | dict[str, float] | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Fetch the built-in domains into ``<out_dir>/<domain>.jsonl``; returns domain -> path.

    ``out_dir`` defaults to ``<cache>/corpora``. Idempotent: a domain whose output exists with the
    same settings is skipped.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    out = Path(out_dir) if out_dir else cache / "corpora"
    started = time.time()
    paths: dict[str, Path] = {}
    for domain in domains:
        meta = fetch_domain(domain, out, max_mb=max_mb, cache_dir=cache, split=split, force=force)
        paths[domain] = Path(meta["path"])
    note(f"corpora ready in {time.time() - started:.1f}s: {', '.join(paths)} in {out}")
    return paths


def parse_domains(spec: str | Iterable[str]) -> list[str]:
    """``"all"`` or a comma-separated subset of the built-in domains, validated."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if items == ["all"]:
        return list(DOMAINS)
    unknown = [d for d in items if d not in DOMAINS]
    if unknown or not items:
        raise BTXError(
            f"unknown built-in domain(s) {unknown or spec!r}; choose from all, {', '.join(DOMAINS)}"
        )
    return items


def main(argv: list[str] | None = None) -> int:
    """Fetch the built-in domains (code, math, prose, legal, general) as JSONL, one per domain."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__ or "")
    parser.add_argument(
        "--domains", default="all", help="all or a comma list of: " + ", ".join(DOMAINS)
    )
    parser.add_argument("--out-dir", default=None, help="output folder (default <cache>/corpora)")
    parser.add_argument(
        "--max-mb", type=float, default=4.0, help="cap per domain in MB (0 = no cap)"
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="download cache (default $BTX_DATA_CACHE, else the user cache: $BTX_CACHE or $XDG_CACHE_HOME/megatron_btx)",
    )
    parser.add_argument(
        "--split", default="test=0.02,valid=0.02", help="only for the per-split counts shown"
    )
    parser.add_argument("--force", action="store_true", help="rewrite outputs even if up to date")
    args = parser.parse_args(argv)
    try:
        paths = fetch_corpora(
            parse_domains(args.domains),
            args.out_dir,
            args.max_mb,
            args.cache_dir,
            args.split,
            args.force,
        )
    except BTXError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for domain, path in paths.items():
        print(f"{domain}\t{path}")
    return 0
