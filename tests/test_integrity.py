"""Integrity of the checkpoints we write (issue 12, item 10): every file's sha256 is in the
manifest (import, merge, export, training saves), `btx verify` re-hashes them, and export-hf and
merge refuse a source whose files changed unless told not to check (--no-verify-hashes)."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402
from cli_contract import btx  # noqa: E402

from megatron_btx.checkpoint import manifest  # noqa: E402


def flip_a_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def all_files(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but the manifest, computed here with hashlib."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != manifest.MANIFEST
    }


def test_import_records_every_file_and_verify_catches_a_flipped_bit(hf_llama, tmp_path):
    ck = tmp_path / "ck"
    assert btx("import-hf", "--load", str(hf_llama), "--save", str(ck)).returncode == 0
    recorded = manifest.read(ck)["files"]
    assert recorded == all_files(ck) and "__0_0.distcp" in recorded and ".metadata" in recorded
    ok = btx("verify", str(ck))
    assert ok.returncode == 0 and f"ok: {ck}: {len(recorded)} files match" in ok.stdout
    flip_a_bit(ck / "__2_0.distcp")
    bad = btx("verify", str(ck))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [
        f"error: {ck}/__2_0.distcp: sha256 differs from the manifest's (the file changed)"
    ]
    (ck / "__1_0.distcp").unlink()
    (ck / "extra.bin").write_bytes(b"x")
    lines = btx("verify", str(ck)).stderr.splitlines()
    assert len(lines) == 3 and "__1_0.distcp: missing" in lines[0]
    assert "__2_0.distcp: sha256 differs" in lines[1] and "extra.bin: not recorded" in lines[2]


def test_export_checks_the_source_unless_told_not_to(mg_llama, tmp_path):
    src = tmp_path / "ck"
    shutil.copytree(mg_llama, src)
    good = btx("export-hf", "--load", str(src), "--save", str(tmp_path / "hf"))
    assert good.returncode == 0, good.stderr[-2000:]
    exported = manifest.read(tmp_path / "hf")["files"]
    assert exported == all_files(tmp_path / "hf") and "model.safetensors" in exported
    assert btx("verify", str(tmp_path / "hf")).returncode == 0
    flip_a_bit(src / "__3_0.distcp")
    bad = btx("export-hf", "--load", str(src), "--save", str(tmp_path / "hf2"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: {src}/__3_0.distcp: sha256 differs from the manifest's (the file changed); "
        f"pass --no-verify-hashes to use it anyway"
    ]
    assert not (tmp_path / "hf2").exists()
    forced = btx(
        "export-hf", "--load", str(src), "--save", str(tmp_path / "hf2"), "--no-verify-hashes"
    )
    assert forced.returncode == 0 and (tmp_path / "hf2" / "model.safetensors").is_file()


def test_merge_checks_sources_and_records_its_output(mg_llama, tmp_path):
    src = tmp_path / "ck"
    shutil.copytree(mg_llama, src)
    out = tmp_path / "moe"
    good = btx(
        "merge",
        "--experts",
        str(src),
        str(src),
        "--save",
        str(out),
        "--export-hf",
        str(tmp_path / "moe_hf"),
    )
    assert good.returncode == 0, good.stderr[-2000:]
    for folder in (out, tmp_path / "moe_hf"):
        assert manifest.read(folder)["files"] == all_files(folder)
        assert btx("verify", str(folder)).returncode == 0
    flip_a_bit(src / "__1_0.distcp")
    bad = btx("merge", "--experts", str(src), str(src), "--save", str(tmp_path / "m2"))
    assert bad.returncode == 2 and "__1_0.distcp: sha256 differs" in bad.stderr
    assert not (tmp_path / "m2").exists()
    forced = btx(
        "merge",
        "--experts",
        str(src),
        str(src),
        "--save",
        str(tmp_path / "m2"),
        "--no-verify-hashes",
    )
    assert forced.returncode == 0 and manifest.read(tmp_path / "m2")["files"]


def test_training_saves_record_every_file(base, data):
    ck = tc.init_checkpoint(base, data)
    recorded = manifest.read(ck)["files"]
    assert recorded == all_files(ck)
    # megatron-core <= 0.16 keeps the common state in common.pt, 0.17+ inside the .distcp files
    common = ("common.pt",) if (ck / "common.pt").exists() else ()
    for name in ("__0_0.distcp", ".metadata", *common, "config.yaml", "tokenizer/tokenizer.model"):
        assert name in recorded, sorted(recorded)
    assert btx("verify", str(ck)).returncode == 0


def test_merge_without_output_hashes(mg_llama, tmp_path):
    """--no-hash-output: nothing recorded (and nothing hashed while writing); `btx verify`
    then says there is nothing to check."""
    out = tmp_path / "moe"
    proc = btx(
        "merge", "--experts", str(mg_llama), str(mg_llama), "--save", str(out), "--no-hash-output"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert manifest.read(out).get("files") is None
    verify = btx("verify", str(out))
    assert verify.returncode == 2 and "records no file hashes" in verify.stderr


def test_writer_digest_is_the_files_sha256(tmp_path):
    """The digest a DirectWriter computes while writing (on its write-behind thread) is the
    file's sha256; it is forgotten once the file changes, and not computed when switched off."""
    import os

    from megatron_btx.checkpoint.direct_io import DirectWriter, written_digest

    data = os.urandom(5 * 1024 * 1024 + 123)  # spans several staging buffers and a tail
    with DirectWriter(tmp_path / "a.bin", chunk=1024 * 1024) as f:
        f.write(data[:100])
        f.write(data[100:])
    assert written_digest(tmp_path / "a.bin") == hashlib.sha256(data).hexdigest()
    os.replace(tmp_path / "a.bin", tmp_path / "b.bin")  # a rename keeps it
    assert written_digest(tmp_path / "b.bin") == hashlib.sha256(data).hexdigest()
    with open(tmp_path / "b.bin", "ab") as f:
        f.write(b"x")
    assert written_digest(tmp_path / "b.bin") is None
    with DirectWriter(tmp_path / "c.bin", sha256=False) as f:
        f.write(data)
    assert written_digest(tmp_path / "c.bin") is None
