"""File hashes in a checkpoint's manifest, and `btx verify CKPT`.

Every checkpoint we write (import, merge, export, training saves) records in its manifest the
sha256 of each of its files (``files``: path relative to the checkpoint -> hex digest). torch's
loaders check nothing (a flipped bit in a `.distcp` loads and exports silently), so this is what
catches a corrupted copy, download or disk:

- `btx verify CKPT` re-hashes every file and prints one line per problem (a changed, missing or
  unrecorded file), exit code 2 when there is one;
- `btx export-hf` checks the source while it exports (a second thread), `btx merge` checks each
  megatron source with the hashes it computes anyway for the output's provenance; both fail
  before the output is committed, and `--no-verify-hashes` turns the check off.

Writing costs little: the checkpoint writers hash their large files as they write them (on the
write-behind thread, see :func:`~megatron_btx.checkpoint.direct_io.written_digest`), and a
training save hashes each rank's own files on that rank (:func:`gather_rank_hashes`).
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any

from megatron_btx.checkpoint import manifest
from megatron_btx.checkpoint.direct_io import written_digest
from megatron_btx.errors import BTXError

FILES = "files"
#: files that are never recorded: the manifest itself and the output's lock
UNRECORDED = (manifest.MANIFEST,)


def _listed(folder: Path) -> list[str]:
    """Every regular file under `folder`, as a relative POSIX path (sorted). A symbolic link is
    listed as the file it points to when that lies inside the checkpoint, as every reader takes
    it; a link out of it is refused (:func:`megatron_btx.inputs.inside`), as every reader does."""
    from megatron_btx.inputs import inside

    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel in UNRECORDED:
                continue
            if path.is_symlink():
                inside(folder, path)
            if path.is_file():
                out.append(rel)
    return sorted(out)


def hash_tree(
    folder: str | os.PathLike[str], known: dict[str, str] | None = None
) -> dict[str, str]:
    """sha256 of every file of a checkpoint folder (recursive; not the manifest): taken from
    `known` or from what this process's writers computed while writing, else read and hashed."""
    folder = Path(folder)
    known = known or {}
    out = {}
    for rel in _listed(folder):
        path = folder / rel
        out[rel] = known.get(rel) or written_digest(path) or manifest.sha256_file(path)
    return out


def gather_rank_hashes(folder: str | os.PathLike[str]) -> dict[str, str]:
    """In a training save (all ranks, after megatron-core wrote the checkpoint): each rank
    hashes the data files it wrote (``__<rank>_*.distcp``, still in its page cache), and rank 0
    receives them all; the cost is split across the ranks. {} on the other ranks."""
    import torch.distributed as dist

    folder = Path(folder)
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = {p.name: manifest.sha256_file(p) for p in sorted(folder.glob(f"__{rank}_*.distcp"))}
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    every: list[Any] = [None] * dist.get_world_size() if rank == 0 else []
    dist.gather_object(mine, every if rank == 0 else None, dst=0)
    return {k: v for part in every for k, v in part.items()} if rank == 0 else {}


def problems(
    folder: str | os.PathLike[str],
    recorded: dict[str, str] | None = None,
    share: tuple[int, int] = (0, 1),
) -> list[str]:
    """What differs between a checkpoint's files and its manifest's record of them, one line
    each (empty when everything matches). `share` = (rank, world): this process re-hashes
    every world-th recorded file from its rank on (the processes of a training job split the
    work); rank 0 also reports the missing and unrecorded files."""
    folder = Path(folder)
    if recorded is None:
        recorded = recorded_hashes(folder)
    rank, world = share
    lines = []
    present = set(_listed(folder))
    for i, (rel, digest) in enumerate(sorted(recorded.items())):
        path = folder / rel
        if rel not in present:
            if rank == 0:
                lines.append(f"{path}: missing (the manifest records it)")
        elif i % world == rank and manifest.sha256_file(path) != digest:
            lines.append(f"{path}: sha256 differs from the manifest's (the file changed)")
    if rank == 0:
        for rel in sorted(present - set(recorded)):
            lines.append(f"{folder / rel}: not recorded in the manifest (added afterwards)")
    return lines


def recorded_hashes(folder: str | os.PathLike[str]) -> dict[str, str]:
    """The manifest's file hashes; BTXError when it records none (written before they were)."""
    recorded = manifest.read(folder).get(FILES)
    if not recorded:
        raise BTXError(
            f"{folder}: its {manifest.MANIFEST} records no file hashes (written by an older "
            f"megatron_btx); nothing to verify against"
        )
    return recorded


def check(
    folder: str | os.PathLike[str],
    share: tuple[int, int] = (0, 1),
    flag: str = "--no-verify-hashes",
) -> None:
    """BTXError naming the first problem (and how many) when the files do not match (this
    process's `share` of them, see :func:`problems`); `flag` is how the user skips the check."""
    found = problems(folder, share=share)
    if found:
        more = f" (and {len(found) - 1} more; see `btx verify {folder}`)" if len(found) > 1 else ""
        raise BTXError(f"{found[0]}{more}; pass {flag} to use it anyway")


class BackgroundCheck:
    """:func:`check` of a checkpoint that records hashes, run on a second thread while the
    caller reads it (`result` waits and raises); a no-op for a checkpoint without hashes or
    when not `enabled`."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        enabled: bool = True,
        share: tuple[int, int] = (0, 1),
        flag: str = "--no-verify-hashes",
    ):
        self._pool = None
        self._job = None
        if enabled and manifest.read(folder).get(FILES):
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            self._job = self._pool.submit(check, folder, share, flag)

    def result(self) -> None:
        if self._job is not None:
            try:
                self._job.result()
            finally:
                self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def check_source(folder: str | os.PathLike[str], computed: dict[str, str]) -> None:
    """A merge source's files, hashed by the merge for its provenance record (`computed`: file
    name -> sha256), against its manifest's record; a source without one is not checked."""
    try:
        recorded = manifest.read(folder).get(FILES) or {}
    except BTXError:
        return  # an HF folder (no manifest): nothing recorded
    for name, digest in computed.items():
        if name in recorded and recorded[name] != digest:
            raise BTXError(
                f"{Path(folder) / name}: sha256 differs from its manifest's (the file changed); "
                f"pass --no-verify-hashes to merge it anyway"
            )
