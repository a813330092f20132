"""The checkpoint writers' I/O pieces: O_DIRECT write-behind files, CRC-free torch.save chunks,
storage slices instead of copies, the streamed sha256, reads into given buffers."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

import pytest
import torch

from megatron_btx.checkpoint import manifest
from megatron_btx.checkpoint.dcp_stream import _no_zip_crc32, _own_storage
from megatron_btx.checkpoint.direct_io import DirectWriter, WriteBehind


def _pieces(seed: int, sizes: list[int]) -> list[bytes]:
    g = torch.Generator().manual_seed(seed)
    return [
        bytes(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy()) for n in sizes
    ]


@pytest.mark.parametrize(
    "sizes",
    [
        [],  # empty file
        [1],
        [4095, 1, 4096, 4097],  # around the alignment
        [3] * 5000,  # many small writes (torch.save headers)
        [5 * 65536 + 17, 123, 2 * 65536],  # larger than a chunk, unaligned tail
    ],
)
def test_direct_writer_bytes_round_trip(tmp_path: Path, sizes: list[int]):
    data = _pieces(len(sizes), sizes)
    path = tmp_path / "f.bin"
    with DirectWriter(path, chunk=65536, depth=2) as w:
        pos = 0
        for b in data:
            assert w.tell() == pos
            assert w.write(b) == len(b)
            pos += len(b)
    want = b"".join(data)
    got = path.read_bytes()
    assert len(got) == len(want)
    assert got == want


def test_direct_writer_takes_tensor_memory_and_torch_save(tmp_path: Path):
    """torch.save writes through it; the file loads back to the same tensor, bit for bit."""
    t = torch.randn(1000, 77).to(torch.bfloat16)
    path = tmp_path / "t.pt"
    with DirectWriter(path, chunk=8192) as w, _no_zip_crc32():
        torch.save(t, w)
        end = w.tell()
    assert end == path.stat().st_size
    back = torch.load(path, weights_only=True)
    assert torch.equal(back.view(torch.int16), t.view(torch.int16))


def test_direct_writer_without_o_direct_writes_the_same_bytes(tmp_path: Path, monkeypatch):
    """No O_DIRECT on this OS: the writer goes through the page cache, same bytes on disk."""
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    data = _pieces(7, [70000, 3, 9000])
    with DirectWriter(tmp_path / "f.bin", chunk=16384) as w:
        for b in data:
            w.write(b)
        assert not w.direct
    assert (tmp_path / "f.bin").read_bytes() == b"".join(data)


def test_direct_writer_falls_back_when_a_direct_write_is_refused(tmp_path: Path, monkeypatch):
    """A file system that accepts O_DIRECT at open but refuses the write (EINVAL) gets the rest of
    the file through the page cache, the refused block included."""
    real = os.pwrite
    w = DirectWriter(tmp_path / "f.bin", chunk=16384)
    if not w.direct:
        w.close()
        pytest.skip("this file system refuses O_DIRECT at open")
    dfd = w._dfd

    def pwrite(fd, data, offset):
        if fd == dfd:
            raise OSError(22, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = _pieces(8, [40000, 5, 30000])
    for b in data:
        w.write(b)
    w.close()
    assert not w.direct
    assert (tmp_path / "f.bin").read_bytes() == b"".join(data)


def test_direct_writer_reports_a_failed_write(tmp_path: Path):
    """An error in the background write surfaces in the caller, not silently."""
    w = DirectWriter(tmp_path / "f.bin", chunk=4096, depth=1)
    os.close(w._fd)  # the tail goes through this descriptor; make it fail
    if w._dfd >= 0:
        os.close(w._dfd)
    w.write(b"x" * 100)
    with pytest.raises(OSError):
        w.close()
    with pytest.raises(ValueError):
        w.write(b"y")


def test_crc_free_save_loads_and_restores_the_setting():
    """torch.load ignores the zip CRC (a flipped byte loads silently even with it), so chunks are
    saved without it; the global torch setting is restored afterwards."""
    before = torch.serialization.get_crc32_options()
    t = torch.arange(1000, dtype=torch.float32)
    buf = io.BytesIO()
    with _no_zip_crc32():
        assert torch.serialization.get_crc32_options() is False
        torch.save(t, buf)
    assert torch.serialization.get_crc32_options() == before
    assert torch.equal(torch.load(io.BytesIO(buf.getvalue()), weights_only=True), t)


def test_own_storage_shares_memory_and_saves_only_its_bytes():
    base = torch.randn(64, 32)
    half = base[32:]  # a view: torch.save would write the whole 64-row storage
    own = _own_storage(half)
    assert own.data_ptr() == half.data_ptr()
    assert own.untyped_storage().nbytes() == half.numel() * 4
    b_own, b_full = io.BytesIO(), io.BytesIO()
    torch.save(own, b_own)
    torch.save(half, b_full)
    assert len(b_full.getvalue()) - len(b_own.getvalue()) == 32 * 32 * 4
    assert torch.equal(torch.load(io.BytesIO(b_own.getvalue()), weights_only=True), half)
    whole = torch.randn(8, 8)
    assert _own_storage(whole) is whole


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * 1024 * 1024 + 5])
def test_sha256_file_matches_hashlib(tmp_path: Path, size: int):
    p = tmp_path / "f"
    p.write_bytes(os.urandom(size))
    assert manifest.sha256_file(p, window=1024 * 1024) == hashlib.sha256(p.read_bytes()).hexdigest()


def test_files_sharing_a_write_behind_round_trip_without_waiting_at_close(tmp_path: Path):
    """Many files through one WriteBehind of 3 buffers: close() returns while their bytes may
    still be queued; after drain() every file holds exactly its bytes, and the buffers used stay
    the same 3 however many files and bytes went through."""
    files = {
        tmp_path / f"part{i}.bin": _pieces(i, [70000 * (i % 3), 5, 4096 * i + 3]) for i in range(12)
    }
    with WriteBehind(chunk=16384, depth=2) as wb:
        bufs = {id(b) for b in wb._bufs}
        for path, data in files.items():
            w = DirectWriter(path, behind=wb)
            for b in data:
                w.write(b)
            w.close()
            with pytest.raises(ValueError):
                w.write(b"late")
        wb.drain()
        for path, data in files.items():
            assert path.read_bytes() == b"".join(data)
        assert {id(b) for b in wb._bufs} == bufs and len(bufs) == 3
    assert not wb._thread.is_alive()


def test_shared_write_behind_reports_a_failed_file_at_drain_and_next_write(tmp_path: Path):
    wb = WriteBehind(chunk=4096, depth=1)
    bad = DirectWriter(tmp_path / "bad.bin", behind=wb)
    os.close(bad._fd)  # its tail write fails in the background
    if bad._dfd >= 0:
        os.close(bad._dfd)
    bad.write(b"x" * 100)
    bad.close()  # queued: does not raise yet
    with pytest.raises(OSError):
        wb.drain()
    good = DirectWriter(tmp_path / "good.bin", behind=wb)
    with pytest.raises(OSError):
        good.write(b"y" * 10000)  # the first error sticks: nothing more is written
    good.close()
    with pytest.raises(OSError):
        wb.close()
    assert not wb._thread.is_alive()


def test_streaming_dcp_writer_stops_its_thread_when_the_caller_fails(tmp_path: Path):
    from megatron_btx.checkpoint.dcp_stream import StreamingDCPWriter

    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="caller failed"):
        with StreamingDCPWriter(tmp_path):
            raise RuntimeError("caller failed")
    left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert left == []
