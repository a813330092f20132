"""Sizes read from a checkpoint are bounded by what its files hold, before anything is allocated
(issue 23, items 2 and 3).

Each attack is a real checkpoint (the converted tiny Llama of conftest) with one file edited as
an attacker would: a 30-byte `.metadata` that asks the allow-listed `bytearray` for 2 GB, one
that asks CPython's unpickler for a 100-million-entry memo table, a manifest that claims a
billion experts or an intermediate size of 10^10, two chunks of one tensor that overlap (their
volumes still add up to the tensor's, which used to pass as "complete" and export heap bytes),
and a chunk removed (a gap a load would leave at its initial values). Every command refuses
with one line and exit 2, writes nothing, and stays under 1 GB of resident memory: the peak is
measured from outside (`wait4`'s rusage of the process).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_btx.checkpoint import manifest
from megatron_btx.errors import BTXError

ROOT = Path(__file__).resolve().parents[1]
EMB = "embedding.word_embeddings.weight"


def _rerecord(folder: Path, *names: str) -> None:
    """Record the edited files' sha256 in the manifest, so that what refuses them is the size
    check, not the hash check."""
    m = json.loads((folder / manifest.MANIFEST).read_text())
    for name in names:
        m["files"][name] = manifest.sha256_file(folder / name)
    (folder / manifest.MANIFEST).write_text(json.dumps(m))


def bytearray_bomb(folder: Path) -> None:
    # PROTO 4; GLOBAL builtins.bytearray; BININT 2e9; TUPLE1; REDUCE; STOP: 30 bytes
    data = b"\x80\x04cbuiltins\nbytearray\nJ" + struct.pack("<i", 2_000_000_000) + b"\x85R."
    (folder / ".metadata").write_bytes(data)
    _rerecord(folder, ".metadata")


def memo_bomb(folder: Path) -> None:
    # PROTO 4; EMPTY_LIST; LONG_BINPUT 100_000_000; STOP: CPython sizes its memo by the index
    (folder / ".metadata").write_bytes(b"\x80\x04]r" + struct.pack("<I", 100_000_000) + b".")
    _rerecord(folder, ".metadata")


def list_bomb(folder: Path) -> None:
    # builtins.list(builtins.range(10**9)): eight gigabytes of pointers from 40 bytes
    data = b"\x80\x04cbuiltins\nlist\ncbuiltins\nrange\nJ" + struct.pack("<i", 10**9)
    (folder / ".metadata").write_bytes(data + b"\x85R\x85R.")
    _rerecord(folder, ".metadata")


def _edit_manifest(folder: Path, **model) -> None:
    m = json.loads((folder / manifest.MANIFEST).read_text())
    m["model"].update(model)
    (folder / manifest.MANIFEST).write_text(json.dumps(m))


def experts_bomb(folder: Path) -> None:
    _edit_manifest(folder, num_local_experts=10**9)


def ffn_bomb(folder: Path) -> None:
    _edit_manifest(folder, intermediate_size=10**10)


def _chunked_embedding(folder: Path, spans: list[tuple[int, int]]) -> None:
    """The embedding (384 x 64) stored as well-formed chunks of the given row spans, each with
    its own data in a new data file, as another writer might have laid it out."""
    import io

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    md = pickle.loads((folder / ".metadata").read_bytes())  # our own file: trusted here
    entry = md.state_dict_metadata[EMB]
    (chunk,) = entry.chunks
    info = md.storage_data.pop(MetadataIndex(EMB, chunk.offsets))
    with open(folder / info.relative_path, "rb") as f:
        f.seek(info.offset)
        weight = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
    cols = weight.shape[1]
    data = bytearray()
    entry.chunks[:] = []
    for index, (start, stop) in enumerate(spans):
        blob = io.BytesIO()
        torch.save(weight[start:stop].clone(), blob)
        part = ChunkStorageMetadata(torch.Size([start, 0]), torch.Size([stop - start, cols]))
        entry.chunks.append(part)
        md.storage_data[MetadataIndex(EMB, part.offsets, index)] = _StorageInfo(
            "__9_0.distcp", len(data), len(blob.getvalue())
        )
        data += blob.getvalue()
    (folder / "__9_0.distcp").write_bytes(bytes(data))
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    _rerecord(folder, ".metadata", "__9_0.distcp")


def overlapping_chunks(folder: Path) -> None:
    """Rows [0, 200) and [192, 376): 384 rows in all, as many as the tensor has, so a count of
    volumes calls it complete; rows 192-199 are written twice and 376-383 never."""
    _chunked_embedding(folder, [(0, 200), (192, 376)])


def gap_in_embedding(folder: Path) -> None:
    """Rows [0, 192) and [200, 384): 8 rows unwritten, no overlap."""
    _chunked_embedding(folder, [(0, 192), (200, 384)])


ATTACKS = [bytearray_bomb, memo_bomb, list_bomb, experts_bomb, ffn_bomb, overlapping_chunks]


@pytest.fixture
def attacked(mg_llama, tmp_path):
    """attacked(attack) -> a copy of the converted tiny Llama with `attack` applied."""

    def make(attack) -> Path:
        folder = tmp_path / attack.__name__
        shutil.copytree(mg_llama, folder)
        attack(folder)
        return folder

    return make


@pytest.mark.parametrize(
    "attack, message",
    [
        (bytearray_bomb, "asks bytearray() to build 2000000000 elements"),
        (memo_bomb, "memo index 100000000 out of sequence"),
        (list_bomb, "asks list() to build 1000000000 elements"),
        (overlapping_chunks, "chunks at (0, 0) of (200, 64) and at (192, 0) of (184, 64) overlap"),
    ],
)
def test_metadata_bombs_are_refused_by_the_reader(attacked, attack, message):
    from megatron_btx.checkpoint.dcp_stream import read_metadata

    folder = attacked(attack)
    with pytest.raises(BTXError, match=re.escape(message)) as e:
        read_metadata(folder)
    assert "\n" not in str(e.value) and str(folder / ".metadata") in str(e.value)


@pytest.mark.parametrize("attack", [experts_bomb, ffn_bomb])
def test_manifest_sizes_are_bounded_by_the_bytes_held(attacked, attack):
    """The sizes are checked before any model (even a meta one) is built: the lower bound of
    the parameters a billion experts (or FFNs of 10^10) need, against the checkpoint's bytes."""
    from megatron_btx.checkpoint.megatron_io import read_args

    folder = attacked(attack)
    with pytest.raises(BTXError, match="need at least .* bytes of weights; the checkpoint holds"):
        read_args(folder)


def test_the_bound_counts_a_real_checkpoint_from_below(mg_llama, mg_mixtral):
    """The lower bound of the parameters is below what every real checkpoint holds (so no real
    checkpoint is refused) and above half of it (so it bounds): hand count for the tiny Llama
    (hidden 64, FFN 96, 4 layers, 4 heads of 16 with 2 KV heads, vocabulary 300, untied) and
    the tiny Mixtral (2 layers, 4 experts)."""
    from megatron_btx.checkpoint.bounds import least_params, stored_bytes
    from megatron_btx.checkpoint.dcp_stream import read_metadata
    from megatron_btx.checkpoint.megatron_io import read_args, read_variant

    attention = 64 * 16 * (2 * 4 + 2 * 2)  # q, o: 4 heads; k, v: 2 heads; of 16 x 64
    llama = 300 * 64 * 2 + 4 * (attention + 3 * 64 * 96)
    assert least_params(read_args(mg_llama)) == llama
    mixtral = 300 * 64 * 2 + 2 * (attention + 3 * 64 * 96 * 4)
    assert least_params(read_args(mg_mixtral), read_variant(mg_mixtral)) == mixtral
    for folder, params in ((mg_llama, llama), (mg_mixtral, mixtral)):
        held = stored_bytes(read_metadata(folder))
        assert params * 4 <= held < 2 * params * 4  # fp32: the norms and padding are the rest


def test_overlapping_and_missing_chunks_never_export_heap_bytes(attacked, tmp_path):
    """Before, two overlapping chunks passed the volume count and export-hf wrote the rows no
    chunk covered as uninitialised memory, exit 0. A gap (no overlap) is refused where it is
    read: by the export's reader and by megatron-core's load into a model."""
    from megatron_btx.checkpoint.convert import megatron_to_hf

    overlap = attacked(overlapping_chunks)
    with pytest.raises(BTXError, match=r"of \(184, 64\) overlap; the checkpoint is corrupt"):
        megatron_to_hf(overlap, tmp_path / "hf_overlap")
    assert not (tmp_path / "hf_overlap").exists()

    gap = attacked(gap_in_embedding)
    with pytest.raises(BTXError, match="cover 24064 of the 24576 elements"):  # 8 x 64 short
        megatron_to_hf(gap, tmp_path / "hf_gap")
    assert not (tmp_path / "hf_gap").exists()


def test_a_gap_is_refused_by_megatron_cores_load(attacked, cpu_runtime):
    """The load of a whole model (training's init_from and resume, evaluation): DCP fills what
    the chunks cover and used to leave the rest at the model's initial values, silently."""
    from megatron_btx.checkpoint.megatron_io import load_model, read_args
    from megatron_btx.models.llama import build_for_checkpoint

    gap = attacked(gap_in_embedding)
    model = build_for_checkpoint(read_args(gap), torch.float32)
    with pytest.raises(BTXError, match=r"cover 24064 of the 24576 elements at \(0, 0\)"):
        load_model(model, gap)


RSS_DRIVER = """
import json, sys
from megatron_btx.cli import main
codes = [main(json.loads(a)) for a in sys.argv[1:]]
print("codes", *codes)
"""


@pytest.mark.slow
def test_refused_checkpoints_stay_under_a_gigabyte(attacked, tmp_path):
    """Every attack through export-hf and merge in one process: each exits 2 with one line and
    writes nothing, and the process's peak resident memory (from wait4, which includes torch's
    and megatron-core's own import) stays under 1 GB. Before, the `bytearray` file took 2.2 GB
    and the billion experts were OOM-killed at 23 GB."""
    commands = []
    outputs = []
    for attack in ATTACKS:
        folder = attacked(attack)
        hf, moe = tmp_path / f"{attack.__name__}_hf", tmp_path / f"{attack.__name__}_moe"
        outputs += [hf, moe]
        commands.append(["export-hf", "--load", str(folder), "--save", str(hf)])
        commands.append(["merge", "--experts", str(folder), str(folder), "--save", str(moe)])
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "w") as out_file, open(err_path, "w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", RSS_DRIVER, *(json.dumps(c) for c in commands)],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
            stdout=out_file,
            stderr=err_file,
            stdin=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
    out, err = out_path.read_text(), err_path.read_text()
    assert os.waitstatus_to_exitcode(status) == 0, err[-3000:]
    assert out.split() == ["codes"] + ["2"] * len(commands), err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == len(commands) and "Traceback" not in err, err[-3000:]
    assert not any(p.exists() for p in outputs)
    peak_mb = usage.ru_maxrss / 1024  # kilobytes on Linux
    print(f"peak RSS of {len(commands)} refused commands in one process: {peak_mb:.0f} MB")
    assert peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"
