"""Symbolic links, FIFOs and devices in the folders we read and write, and the locks that keep
two commands apart (issue 23, item 4 and the "Symlinks", "Locks" and "Hangs" gaps).

The rule for what we read: a file read from a checkpoint (or data) folder lies inside it, every
link resolved; the Hugging Face hub's snapshot folders, whose files link into the repository's
`blobs/`, are the one layout followed. For what we write: a `--save` that is a link is followed
(its folder is replaced, the link kept), never replaced by a folder of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402
from cli_contract import btx, one_error  # noqa: E402

from megatron_btx import rundir  # noqa: E402
from megatron_btx.checkpoint import manifest  # noqa: E402
from megatron_btx.errors import BTXError  # noqa: E402

SECRET = "the contents of ~/.ssh/id_rsa"
#: the refusal of a link out of a folder (not a word of the test's own paths)
LINK_OUT = "a file read from a checkpoint or data folder must lie inside it"


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "elsewhere" / "id_rsa"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


def _tree_has(folder: Path, text: str) -> bool:
    return folder.exists() and any(
        text in p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()
    )


def test_overwrite_onto_a_symlink_replaces_the_folder_it_points_to(mg_llama, tmp_path):
    """Twice, as the red team did: the first run used to replace the link with a folder and
    leave `.NAME.tmp` (the link) behind; the second failed on that leftover."""
    from megatron_btx.checkpoint.convert import megatron_to_hf

    real = tmp_path / "scratch" / "export"
    link = tmp_path / "export"
    megatron_to_hf(mg_llama, real)
    link.symlink_to(real, target_is_directory=True)
    for _ in range(2):
        (real / "stale.txt").write_text("from the previous export")
        megatron_to_hf(mg_llama, link, overwrite=True)
        assert link.is_symlink() and link.resolve() == real.resolve()
        assert not (real / "stale.txt").exists() and (real / "model.safetensors").is_file()
        assert manifest.read(link)["kind"] == "hf_llama"
    assert sorted(os.listdir(tmp_path)) == ["export", "scratch"]  # no .export.tmp, no lock
    assert os.listdir(real.parent) == ["export"]
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(BTXError, match="a symbolic link to .*nowhere, which does not exist"):
        megatron_to_hf(mg_llama, tmp_path / "dangling")
    assert not (tmp_path / "nowhere").exists()


def test_tokenizer_links_out_of_a_checkpoint_are_never_copied(hf_llama, mg_llama, tmp_path, secret):
    """A `special_tokens_map.json` linked to a secret file: import-hf, merge and export-hf (a
    converted checkpoint's `tokenizer/` file linked out) refuse it; the secret is in no output."""
    from megatron_btx.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_btx.checkpoint.sources import open_source

    hf = tmp_path / "hf"
    shutil.copytree(hf_llama, hf)
    (hf / "special_tokens_map.json").symlink_to(secret)
    with pytest.raises(BTXError, match="special_tokens_map.json: tokenizer file is a symbolic"):
        hf_to_megatron(hf, tmp_path / "imported")
    with pytest.raises(BTXError, match=LINK_OUT):
        open_source(hf)
    mg = tmp_path / "mg"
    shutil.copytree(mg_llama, mg)
    (mg / "tokenizer").mkdir(exist_ok=True)
    (mg / "tokenizer" / "special_tokens_map.json").symlink_to(secret)
    with pytest.raises(BTXError, match=LINK_OUT):
        megatron_to_hf(mg, tmp_path / "exported")
    for out in ("imported", "exported"):
        assert not (tmp_path / out).exists() and not _tree_has(tmp_path / out, SECRET)


def test_weight_files_linked_out_are_refused_and_hub_snapshots_are_followed(hf_llama, tmp_path):
    """A weight_map entry naming a subfolder that links out of the checkpoint is refused; a
    Hugging Face hub snapshot (every file a link into the repository's blobs/) is read."""
    from megatron_btx.checkpoint.hf import HFReader

    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(hf_llama / "model.safetensors", outside / "model.safetensors")
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(hf_llama / "config.json", hf / "config.json")
    (hf / "sub").symlink_to(outside, target_is_directory=True)
    keys = HFReader(hf_llama).keys()
    index = {"metadata": {}, "weight_map": {k: "sub/model.safetensors" for k in keys}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BTXError, match="weight file is a symbolic link to .*outside"):
        HFReader(hf)

    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in hf_llama.iterdir():
        blob = repo / "blobs" / f"sha-{path.name}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    assert HFReader(snapshot).keys() == keys


def test_verify_and_the_readers_agree_on_linked_data_files(mg_llama, tmp_path):
    """`btx verify` called a linked `.distcp` "missing" while merge read it. Now a link inside
    the checkpoint is the file it names for both, and a link out of it is refused by both."""
    from megatron_btx.checkpoint import integrity
    from megatron_btx.checkpoint.dcp_stream import read_metadata

    inside, outside = tmp_path / "inside", tmp_path / "outside"
    for folder in (inside, outside):
        shutil.copytree(mg_llama, folder)
        data = sorted(folder.glob("*.distcp"))[0]
        store = folder / "store" if folder == inside else tmp_path / "store"
        store.mkdir(exist_ok=True)
        shutil.move(data, store / data.name)
        data.symlink_to(store / data.name)
    m = json.loads((inside / manifest.MANIFEST).read_text())
    m["files"] = integrity.hash_tree(inside)  # the moved file is now recorded under store/
    (inside / manifest.MANIFEST).write_text(json.dumps(m))
    assert integrity.problems(inside) == []
    read_metadata(inside)
    with pytest.raises(BTXError, match=LINK_OUT):
        integrity.problems(outside)
    with pytest.raises(BTXError, match=LINK_OUT):
        read_metadata(outside)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_fifo_or_device_config_fails_at_once(hf_llama, tmp_path, kind):
    """`config.json` as a FIFO blocked import-hf forever; linked to /dev/zero it read until
    memory ran out. Both are one line in seconds."""
    hf = tmp_path / "hf"
    shutil.copytree(hf_llama, hf)
    (hf / "config.json").unlink()
    if kind == "fifo":
        os.mkfifo(hf / "config.json")
    else:
        (hf / "config.json").symlink_to("/dev/zero")
    proc = btx("import-hf", "--load", str(hf), "--save", str(tmp_path / "out"), timeout=60)
    one_error(proc, "config.json")
    assert not (tmp_path / "out").exists()


HOLDER = """
import sys, time
from megatron_btx import rundir
with rundir.locked(sys.argv[1], "run directory"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_an_output_inside_a_held_run_directory_is_refused(mg_llama, tmp_path):
    """export-hf --overwrite replaced a checkpoint inside a run that `btx train` held (the
    training then failed). The run directory's lock, as `btx train` takes it, now covers every
    output written inside it."""
    run = tmp_path / "run"
    target = run / "checkpoints" / "iter_0000000"
    shutil.copytree(mg_llama, target)
    before = manifest.sha256_file(target / ".metadata")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        cwd=tc.ROOT,
        env=tc.env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = btx("export-hf", "--load", str(mg_llama), "--save", str(target), "--overwrite")
        one_error(proc, f"in use by another btx command (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    assert manifest.sha256_file(target / ".metadata") == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_0000000"]


ORPHAN = """
import os, subprocess, sys
from megatron_btx import rundir
rundir.hold_for_exec(sys.argv[1], "run directory")  # as `btx train --nproc-per-node` does
worker = (
    "import sys, time\\n"
    "from megatron_btx.training.cli import _run_lock\\n"
    "_run_lock(sys.argv[1]).__enter__()\\n"
    "print('running', flush=True)\\n"
    "time.sleep(120)\\n"
)
child = subprocess.Popen([sys.executable, "-c", worker, sys.argv[1]], close_fds=False,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
assert child.stdout.readline().strip() == "running"
print(child.pid, flush=True)
os._exit(0)  # the launcher dies; its worker keeps the inherited lock
"""


def test_a_lock_kept_by_an_orphaned_worker_names_the_worker(tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.run(
        [sys.executable, "-c", ORPHAN, str(run)],
        cwd=tc.ROOT,
        env=tc.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert launcher.returncode == 0, launcher.stderr[-2000:]
    worker = int(launcher.stdout.split()[-1])
    try:
        with pytest.raises(BTXError) as e:
            with rundir.locked(run, "run directory"):
                pass
        assert f"pid {worker}" in str(e.value), str(e.value)
        assert "has exited" in str(e.value), str(e.value)
    finally:
        os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the kernel drops the lock with its last holder
        try:
            with rundir.locked(run, "run directory"):
                break
        except BTXError:
            time.sleep(0.1)
    else:
        raise AssertionError("the lock outlived its holders")
