"""Several domains, one shared tokenizer: ``btx prepare-data --domain ... --output-dir D``.

:func:`prepare_domains` fixes the tokenizer once (trains a SentencePiece model on a
per-domain-balanced sample of the train splits, or installs a given ``.model`` file or HF
``tokenizer.json`` folder into ``D``), tokenises every domain with
:func:`megatron_btx.data.preprocess.preprocess_files` and records everything in
``D/manifest.json``: the inputs' fingerprints and settings (a re-run with the same ones skips all
work), the tokenizer's path, sha256 and special ids, and per-domain document and token counts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_btx.data.hf_tokenizer import HFTokenizer
from megatron_btx.data.names import valid_domain_name
from megatron_btx.data.preprocess import (
    MANIFEST_FORMAT,
    DataWarning,
    expand_inputs,
    iter_documents,
    preprocess_files,
    split_prefix,
)
from megatron_btx.data.splits import SPLITS, parse_split, split_of
from megatron_btx.data.spm_tokenizer import (
    ROUND_TRIP_SETTINGS,
    _sample_sentences,
    train_sentencepiece,
)
from megatron_btx.data.staging import staged_tokenizer
from megatron_btx.data.tokenizer import load_tokenizer
from megatron_btx.data.tokenizer_base import Tokenizer
from megatron_btx.errors import BTXError
from megatron_btx.progress import note


def _fingerprint(files: Iterable[tuple[Path, str]]) -> list[list[Any]]:
    out = []
    for path, _ in files:
        st = path.stat()
        out.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return out


def sample_domain_sentences(
    domains: Mapping[str, Sequence[str | os.PathLike[str]]],
    fractions: dict[str, float],
    max_sentences: int,
    txt_separator: str | None,
    max_read_mb: float,
) -> list[str]:
    """An equal number of lines from each domain's *train* documents, so the shared vocabulary is
    not dominated by the largest domain and held-out text never shapes the tokenizer."""
    per_domain = max(1, max_sentences // max(1, len(domains)))
    budget = int(max_read_mb * 1e6)
    sample: list[str] = []

    def train_docs(paths: Sequence[str | os.PathLike[str]]) -> Iterator[str]:
        read = 0
        for key, text in iter_documents(paths, txt_separator=txt_separator):
            if split_of(key, fractions) == "train":
                yield text
                read += len(text)
                if read >= budget:
                    return

    for paths in domains.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)  # reported once, by preprocess_files
            sample.extend(
                _sample_sentences(train_docs(paths), per_domain, 4000, seed=len(sample) + 1234)
            )
    return sample


def _check_domain_names(domains: Mapping[str, Sequence[str | os.PathLike[str]]]) -> None:
    if not domains:
        raise BTXError(
            "no domains given; pass --domain NAME=PATH (repeatable) or --builtin-domains all"
        )
    for name in domains:
        if not valid_domain_name(name):
            raise BTXError(
                f"domain name {name!r} must be ASCII letters, digits, '-' or '_' (it names files)"
            )


def _settings(
    files: Mapping[str, list[tuple[Path, str]]],
    given: Tokenizer | None,
    vocab_size: int,
    fractions: dict[str, float],
    txt_separator: str | None,
    tokenizer_sentences: int,
) -> dict[str, Any]:
    """What the outputs depend on; a manifest with equal settings (and outputs) is up to date."""
    settings: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "inputs": {name: _fingerprint(f) for name, f in files.items()},
        "vocab_size": None if given else vocab_size,
        "tokenizer_source": None if given else "trained",
        "tokenizer_input_sha256": given.sha256 if given else None,
        "split": fractions,
        "txt_separator": txt_separator,
        "tokenizer_sentences": None if given else tokenizer_sentences,
    }
    if given is not None and given.kind != "sentencepiece":
        # The special ids come from the seed's config files, not from the hashed tokenizer.json.
        settings["tokenizer_kind"] = given.kind
        settings["tokenizer_special_ids"] = [given.bos_id, given.eos_id, given.pad_id]
    return settings


def _up_to_date(out: Path, domains: Iterable[str], settings: dict[str, Any]) -> dict | None:
    """The existing manifest when it records these settings and every output still exists."""
    try:
        old = json.loads((out / "manifest.json").read_text())
        tokenizer = load_tokenizer(out / old["tokenizer"]["path"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, BTXError):
        return None
    outputs_exist = all(
        os.path.isfile(split_prefix(out / name, s) + ext)
        for name in domains
        for s in SPLITS
        for ext in (".bin", ".idx")
    )
    mixed = old.get("mixed")
    if settings.get("mixed") and not (
        mixed and all((out / (mixed["prefix"] + ext)).is_file() for ext in (".bin", ".idx"))
    ):
        outputs_exist = False
    fresh = old.get("settings") == settings and outputs_exist
    return old if fresh and old["tokenizer"].get("sha256") == tokenizer.sha256 else None


def _install_tokenizer(out: Path, given: Tokenizer, staging: Path) -> tuple[Tokenizer, str]:
    """Copy a given tokenizer into `staging` (``tokenizer.model``, or ``tokenizer/`` for an HF
    folder; put in the data folder when every domain is done) unless it already is the folder's;
    return it loaded and its name in the folder."""
    name = "tokenizer.model" if given.kind == "sentencepiece" else "tokenizer"
    if os.path.abspath(given.path) == os.path.abspath(out / name):
        return load_tokenizer(out / name), name
    if given.kind == "sentencepiece":
        shutil.copyfile(given.path, staging / name)
    else:
        given.copy_to(staging / name)
    return load_tokenizer(staging / name), name


def _train_shared_tokenizer(
    domains: Mapping[str, Sequence[str | os.PathLike[str]]],
    out: Path,
    vocab_size: int,
    fractions: dict[str, float],
    txt_separator: str | None,
    max_sentences: int,
    max_read_mb: float,
) -> Tokenizer:
    """Train ``out/tokenizer.model`` on a per-domain-balanced sample of the train splits (`out`:
    the staging folder of :func:`~megatron_btx.data.staging.staged_tokenizer`)."""
    note(
        f"training a {vocab_size}-piece SentencePiece tokenizer on a sample of {', '.join(domains)} ..."
    )
    sentences = sample_domain_sentences(
        domains, fractions, max_sentences, txt_separator, max_read_mb
    )
    tok = train_sentencepiece(sentences, out / "tokenizer", vocab_size)
    note(f"tokenizer {tok.path}: {tok.vocab_size} pieces, sha256 {tok.sha256[:16]}")
    return tok


def _tokenizer_entry(tok: Tokenizer, name: str) -> dict[str, Any]:
    """The manifest's record of the shared tokenizer (what training and the merge check)."""
    entry: dict[str, Any] = {
        "path": name,
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
    }
    if isinstance(tok, HFTokenizer):
        entry.update(kind=tok.kind, files=sorted(tok.files()))
        entry["special_id_sources"] = dict(tok.special.sources)
    else:
        entry["training_settings"] = dict(ROUND_TRIP_SETTINGS)
    return entry


def _prepare_each(
    domains: Mapping[str, Sequence[str | os.PathLike[str]]],
    out: Path,
    tok: Tokenizer,
    fractions: dict[str, float],
    workers: int,
    txt_separator: str | None,
) -> dict[str, Any]:
    """Tokenise every domain into ``out/<domain>_*``; the manifest's per-domain entries."""
    results: dict[str, Any] = {}
    for name, paths in domains.items():
        result = preprocess_files(
            paths, out / name, tok, fractions, workers, txt_separator, name=name
        )
        results[name] = {
            "inputs": [str(p) for p in paths],
            "prefixes": {s: os.path.basename(result["prefixes"][s]) for s in SPLITS},
            **{k: result[k] for k in ("documents", "tokens", "skipped", "problems")},
        }
    return results


def prepare_domains(
    domains: Mapping[str, Sequence[str | os.PathLike[str]]],
    out_dir: str | os.PathLike[str],
    vocab_size: int = 8000,
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    split: str | Mapping[str, float] | None = None,
    workers: int = 1,
    txt_separator: str | None = None,
    tokenizer_sentences: int = 300_000,
    tokenizer_max_read_mb: float = 200.0,
    force: bool = False,
    mixed_tokens: int = 0,
    mixed_seed: int = 0,
) -> dict[str, Any]:
    """Prepare every domain with one shared tokenizer and write ``out_dir/manifest.json``.
    With ``mixed_tokens``, also held-out *mixed* documents of about that many tokens, whose
    paragraphs come from different domains' test documents (:mod:`megatron_btx.data.mixed`).

    Trains ``out_dir/tokenizer.model`` on a per-domain-balanced sample of the train splits, or
    copies ``tokenizer`` there (a SentencePiece ``.model``; an HF folder becomes
    ``out_dir/tokenizer/``), then writes ``out_dir/<domain>_{train,valid,test}_text_document``.
    Skips all work when the manifest records the same inputs (paths, sizes, mtimes) and settings.
    """
    _check_domain_names(domains)
    fractions = parse_split(dict(split) if isinstance(split, Mapping) else split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        files = {name: expand_inputs(paths) for name, paths in domains.items()}
    given = load_tokenizer(tokenizer) if tokenizer else None
    settings = _settings(files, given, vocab_size, fractions, txt_separator, tokenizer_sentences)
    settings["mixed"] = {"tokens": mixed_tokens, "seed": mixed_seed} if mixed_tokens else None
    old = None if force else _up_to_date(out, domains, settings)
    if old is not None:
        note(f"{out}: up to date (manifest.json matches inputs and settings); use --force to redo")
        return old

    started = time.time()
    (out / "manifest.json").unlink(missing_ok=True)  # no manifest until the folder is whole again
    with staged_tokenizer(out) as staging:  # in place once every domain is done, else removed
        if given is not None:
            tok, tok_name = _install_tokenizer(out, given, staging)
        else:
            tok = _train_shared_tokenizer(
                domains,
                staging,
                vocab_size,
                fractions,
                txt_separator,
                tokenizer_sentences,
                tokenizer_max_read_mb,
            )
            tok_name = "tokenizer.model"

        # every domain's datasets staged too: a domain that fails leaves none of the others
        results = _prepare_each(domains, staging, tok, fractions, workers, txt_separator)
        mixed = None
        if mixed_tokens:
            from megatron_btx.data.mixed import prepare_mixed

            mixed = prepare_mixed(
                domains,
                staging,
                tok,
                fractions,
                txt_separator,
                seed=mixed_seed,
                target_tokens=mixed_tokens,
            )
        tokenizer_entry = _tokenizer_entry(tok, tok_name)
    manifest = {
        "settings": settings,
        "mixed": mixed,
        "tokenizer": tokenizer_entry,
        "split": fractions,
        "domains": results,
        "eos_appended": True,
        "megatron_core": _package_version("megatron-core"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 2),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")
    note(
        f"{out}: {len(domains)} domains prepared in {manifest['seconds']:.1f}s; manifest "
        f"{out / 'manifest.json'}"
    )
    return manifest


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
