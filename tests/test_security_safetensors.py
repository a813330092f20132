"""Safetensors headers and indexes are validated before anything is read or allocated (issue
12, items 3 and 10): every hostile header is one BTXError naming the file and the tensor, and
`btx import-hf` of such a checkpoint exits 2 with one line and writes nothing."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_btx.checkpoint.hf import HFReader, PreadSafetensors
from megatron_btx.errors import BTXError

ROOT = Path(__file__).resolve().parents[1]


def write_safetensors(path: Path, header, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


CASES = {
    "short span": ({"w": entry("F32", [4, 4], 0, 32)}, 64, r"'w' is F32\[4, 4\] \(64 bytes\)"),
    "long span": ({"w": entry("F32", [2], 0, 16)}, 16, "data_offsets span 16"),
    "start after end": ({"w": entry("F32", [0], 16, 8)}, 16, "starts at byte 16 after"),
    "overlap": (
        {"a": entry("F32", [16], 0, 64), "b": entry("F32", [16], 32, 96)},
        96,
        "'b' overlaps the bytes of 'a'",
    ),
    "4 TB": ({"w": entry("F32", [1_000_000, 1_000_000], 0, 16)}, 16, "4000000000000 bytes"),
    "past the end": ({"w": entry("F32", [8], 0, 32)}, 16, "past the file's 16 data bytes"),
    "negative dim": ({"w": entry("F32", [-1, 4], 0, 16)}, 16, "not a list of non-negative"),
    "float dim": ({"w": entry("F32", [2.0], 0, 8)}, 16, "not a list of non-negative"),
    "unknown dtype": ({"w": entry("X9", [2], 0, 8)}, 16, "unknown dtype 'X9'"),
    "offsets": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, 8, "data_offsets"),
    "no entry": ({"w": 3}, 8, "no dtype/shape/data_offsets"),
    "list header": ([1, 2, 3], 0, "header is a list, not a map"),
    "metadata": ({"__metadata__": [1]}, 0, "__metadata__ is not a map"),
    "duplicate": (b'{"w": {}, "w": {}}', 0, "names 'w' twice"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, 0, "corrupt or truncated"),
    "not utf-8": (b'{"\xff": 1}', 0, "corrupt or truncated"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_headers_are_refused(tmp_path, case):
    header, size, message = CASES[case]
    path = write_safetensors(tmp_path / "model.safetensors", header, bytes(size))
    with pytest.raises(BTXError, match=message) as e:
        PreadSafetensors([path])
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_huge_declared_shape_allocates_nothing(tmp_path):
    """[1e6, 1e6] of F32 with a consistent span would be 4 TB: refused from the header alone,
    in milliseconds (the file is 16 bytes)."""
    path = write_safetensors(
        tmp_path / "model.safetensors",
        {"w": entry("F32", [10**6, 10**6], 0, 4 * 10**12)},
        bytes(16),
    )
    t0 = time.perf_counter()
    with pytest.raises(BTXError, match="past the file's 16 data bytes"):
        PreadSafetensors([path])
    assert time.perf_counter() - t0 < 1.0


def test_valid_headers_read_back(tmp_path):
    """Empty tensors, tensors in any order and the metadata entry are fine; values round-trip."""
    values = torch.arange(6, dtype=torch.float32)
    header = {
        "__metadata__": {"format": "pt"},
        "b": entry("F32", [2, 3], 0, 24),
        "e": entry("F32", [0, 5], 24, 24),
        "a": entry("BF16", [], 24, 26),
    }
    data = (
        values.numpy().tobytes()
        + torch.tensor(1.5, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    )
    reader = PreadSafetensors([write_safetensors(tmp_path / "x.safetensors", header, data)])
    assert torch.equal(reader.get("b"), values.reshape(2, 3))
    assert reader.get("e").shape == (0, 5) and reader.get("a").item() == 1.5


def _import(load: Path, save: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_btx",
            "import-hf",
            "--load",
            str(load),
            "--save",
            str(save),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in proc.stderr, proc.stderr


def test_import_refuses_a_tensor_shorter_than_its_shape(hf_llama, tmp_path):
    """A real HF checkpoint whose final norm's data_offsets span half its bytes: today's
    readers fill the other half with uninitialised memory; it must be refused."""
    src = tmp_path / "hf"
    shutil.copytree(hf_llama, src)
    path = src / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    start, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [start, start + (end - start) // 2]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    text += b" " * (n - len(text))  # same header length: the data stays where it was
    path.write_bytes(raw[:8] + text + raw[8 + n :])
    proc = _import(src, tmp_path / "out")
    _one_line_error(proc, "'model.norm.weight' is F32[64]")
    assert not (tmp_path / "out").exists()


def test_index_pointing_outside_its_folder_is_refused(hf_llama, tmp_path):
    src, outside = tmp_path / "hf", tmp_path / "elsewhere"
    shutil.copytree(hf_llama, src)
    outside.mkdir()
    shutil.move(src / "model.safetensors", outside / "model.safetensors")
    keys = PreadSafetensors([outside / "model.safetensors"]).keys()
    index = {"weight_map": {k: "../elsewhere/model.safetensors" for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BTXError, match="outside the checkpoint folder"):
        HFReader(src)
    _one_line_error(_import(src, tmp_path / "out"), "outside the checkpoint folder")
    index["weight_map"] = {k: str(outside / "model.safetensors") for k in keys}  # absolute
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BTXError, match="outside the checkpoint folder"):
        HFReader(src)
    assert not (tmp_path / "out").exists()
