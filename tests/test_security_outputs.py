"""Outputs cannot be corrupted by a second command or destroyed by --overwrite (issue 12, items
4 and 7).

Locks are tested with two real commands: the first is stopped (SIGSTOP) as soon as it holds its
lock, the second must fail at once with one line naming the first's pid, and the first, resumed,
still finishes its output. --overwrite never replaces a source, a folder around or inside one,
the current directory or a folder of other files; replacing in place never leaves no output,
even when the process dies between the two renames of a file system without an atomic swap.
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
from megatron_btx.checkpoint import manifest, megatron_io  # noqa: E402
from megatron_btx.errors import BTXError  # noqa: E402

#: a manifest for folders that only need one
_TEST_MANIFEST = manifest.Manifest(kind="test", model={}, dtype="fp32")


def start(*args: str, cwd: Path = tc.ROOT) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_btx", *args],
        cwd=cwd,
        env=tc.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: we can stop it and its children
    )


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group we started (gone already when it finished on its own)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stopped_holding(proc: subprocess.Popen, lock: Path, timeout: float = 180) -> None:
    """Wait until `proc` holds `lock` (the file names its pid), then freeze its process group."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if lock.read_text().strip() == str(proc.pid):
                os.killpg(proc.pid, signal.SIGSTOP)
                return
        except OSError:
            pass
        assert proc.poll() is None, f"exited ({proc.returncode}) before taking {lock}"
        time.sleep(0.01)
    raise AssertionError(f"{lock} was not taken in {timeout} s")


def test_second_merge_into_one_save_is_refused(mg_llama, tmp_path):
    save = tmp_path / "moe"
    # --verify: the first merge re-reads and runs its output before committing, holding its
    # lock for seconds
    first = start(
        "merge", "--experts", str(mg_llama), str(mg_llama), "--save", str(save), "--verify"
    )
    try:
        stopped_holding(first, tmp_path / ".moe.lock")
        second = btx(
            "merge", "--experts", str(mg_llama), str(mg_llama), "--save", str(save), "--overwrite"
        )
        one_error(second, f"in use by another btx command (pid {first.pid})")
    finally:
        _signal_group(first, signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    assert manifest.read(save)["merge"]["num_experts"] == 2  # the first one's output, whole
    assert not (tmp_path / ".moe.lock").exists() and not (tmp_path / ".moe.tmp").exists()


def test_second_train_on_one_run_dir_is_refused(tmp_path, data):
    cfg = tc.write_config(tmp_path / "c.yaml", tmp_path / "run", data, train={"steps": 3})
    first = subprocess.Popen(
        tc.command(cfg, []),
        cwd=tc.ROOT,
        env=tc.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        stopped_holding(first, tmp_path / "run" / rundir.LOCK_NAME)
        second = tc.run(cfg)
        one_error(second, f"run directory is in use by another btx command (pid {first.pid})")
    finally:
        _signal_group(first, signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    assert tc.latest(tmp_path / "run") == "iter_0000003"
    assert not (tmp_path / "run" / rundir.LOCK_NAME).exists()


def test_second_btx_run_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, base, data):
    config = {
        "run_dir": str(tmp_path / "run"),
        "data": {"prepared": str(data), "seq_length": 64},
        "domains": {"code": "builtin", "toy": "builtin"},
        "seed": {"init_from": str(tc.init_checkpoint(base, data))},  # its architecture
        "experts": {"steps": 50, "micro_batch_size": 2, "global_batch_size": 4},
        "finetune": {"steps": 1, "micro_batch_size": 2, "global_batch_size": 4},
        "baselines": {"dense": False, "sparse_upcycling": False, "btm": False},
        "evaluation": {"tokens_per_domain": 256, "btm_top_k": [1]},
    }
    path = tmp_path / "btx.yaml"
    path.write_text(json.dumps(config))
    first = start("run", str(path), "--quiet")
    try:
        stopped_holding(first, tmp_path / "run" / rundir.LOCK_NAME)
        one_error(btx("run", str(path), "--dry-run"), f"(pid {first.pid})")
    finally:
        _signal_group(first, signal.SIGKILL)  # with any stage it started
        first.wait(timeout=60)
    again = btx("run", str(path), "--dry-run")
    assert again.returncode == 0, again.stderr
    assert "plan:" in again.stdout


def test_lock_is_reentrant_and_survives_a_removed_file(tmp_path):
    folder = tmp_path / "out"
    with rundir.locked(folder) as held, rundir.locked(folder):
        assert held == folder and (folder / rundir.LOCK_NAME).read_text().strip() == str(
            os.getpid()
        )
    assert not (folder / rundir.LOCK_NAME).exists() and not folder.exists()  # nothing left


def test_a_forked_helper_does_not_keep_a_killed_holders_lock(tmp_path):
    """megatron-core's checkpoint writer forks a helper process per save; a run killed mid-save
    must not leave that helper holding the run directory's lock, or the resume that follows at
    once is refused while the orphan finishes its write."""
    folder = tmp_path / "run"
    script = (
        "import os, sys, time\n"
        "from megatron_btx import rundir\n"
        "with rundir.locked(sys.argv[1]):\n"
        "    if os.fork() == 0:\n"  # the orphaned helper, still writing
        "        open(sys.argv[2], 'w').write(str(os.getpid()))\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    while not os.path.exists(sys.argv[2]):\n"
        "        time.sleep(0.01)\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    helper_pid = tmp_path / "helper.pid"
    holder = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(helper_pid)], env=tc.env(), timeout=60
    )
    assert holder.returncode == -signal.SIGKILL
    helper = int(helper_pid.read_text())
    try:
        os.kill(helper, 0)  # the helper outlives the holder
        with rundir.locked(folder):  # the holder is gone: the lock is free at once
            assert (folder / rundir.LOCK_NAME).read_text().strip() == str(os.getpid())
    finally:
        os.kill(helper, signal.SIGKILL)


# ---- --overwrite --------------------------------------------------------------------------------
def test_save_next_to_sources_is_refused(mg_llama, hf_llama, tmp_path):
    """--save equal to a source, inside one or around one is refused by merge, import-hf and
    export-hf, with --overwrite too; the sources are untouched."""
    src = tmp_path / "src"
    shutil.copytree(mg_llama, src)
    before = sorted(p.name for p in src.iterdir())
    for save, relation in (
        (src, "is the source"),
        (src / "out", "lies inside the source"),
        (tmp_path, "holds the source"),
    ):
        one_error(
            btx("merge", "--experts", str(src), str(src), "--save", str(save), "--overwrite"),
            relation,
        )
        one_error(
            btx("export-hf", "--load", str(src), "--save", str(save), "--overwrite"), relation
        )
    one_error(
        btx("import-hf", "--load", str(hf_llama), "--save", str(hf_llama), "--overwrite"),
        "is the source",
    )
    assert sorted(p.name for p in src.iterdir()) == before
    assert json.loads((src / manifest.MANIFEST).read_text())["kind"] == "megatron_torch_dist"


def test_overwrite_only_replaces_our_outputs(mg_llama, hf_llama, tmp_path):
    cwd = tmp_path / "work"
    cwd.mkdir()
    one_error(
        btx("import-hf", "--load", str(hf_llama), "--save", ".", "--overwrite", cwd=cwd),
        "current directory",
    )
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    one_error(
        btx("import-hf", "--load", str(hf_llama), "--save", str(foreign), "--overwrite"),
        "not a megatron_btx checkpoint",
    )
    assert (foreign / "notes.txt").read_text() == "precious"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_error(btx("import-hf", "--load", str(hf_llama), "--save", str(a_file)), "is a file")
    assert a_file.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert btx("import-hf", "--load", str(hf_llama), "--save", str(empty)).returncode == 0
    ours = tmp_path / "ours"
    shutil.copytree(mg_llama, ours)
    (ours / "old.txt").write_text("from the previous checkpoint")
    assert (
        btx("import-hf", "--load", str(hf_llama), "--save", str(ours), "--overwrite").returncode
        == 0
    )
    assert not (ours / "old.txt").exists() and manifest.read(ours)["kind"] == "megatron_torch_dist"


def _filled(folder: Path, text: str) -> None:
    folder.mkdir()
    manifest.write(folder, _TEST_MANIFEST)
    (folder / "data").write_text(text)


def test_killed_between_the_two_renames_recovers(tmp_path, monkeypatch):
    """A file system without an atomic swap: the process dies after moving the old output
    aside and before moving the new one in. The next command puts the old one back (and then
    writes its own); nothing is ever lost."""
    from megatron_btx.checkpoint import swap

    final = tmp_path / "out"
    _filled(final, "old")
    monkeypatch.setattr(swap, "exchange", lambda first, second: False)
    real_replace = os.replace
    calls = []

    def dies_on_second(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with megatron_io.atomic_folder(final, overwrite=True) as tmp:
            manifest.write(tmp, _TEST_MANIFEST)
            (tmp / "data").write_text("new")
            monkeypatch.setattr(os, "replace", dies_on_second)  # from the commit on
    assert calls[0] == ("out", ".out.old") and not final.exists()  # the crash window
    monkeypatch.setattr(os, "replace", real_replace)
    swap.recover(final)
    assert (final / "data").read_text() == "old" and not (tmp_path / ".out.old").exists()
    with megatron_io.atomic_folder(final, overwrite=True) as tmp:  # and a new write works
        manifest.write(tmp, _TEST_MANIFEST)
        (tmp / "data").write_text("new")
    assert (final / "data").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_swap_where_the_file_system_has_it(tmp_path, monkeypatch):
    """renameat2(RENAME_EXCHANGE): one step, the old folder ends under the temporary name; a
    crash before it is removed leaves the new output in place and a stale temporary folder
    that the next write removes."""
    from megatron_btx.checkpoint import swap

    final = tmp_path / "out"
    _filled(final, "old")
    tmp = tmp_path / ".out.tmp"
    _filled(tmp, "new")
    if not swap.exchange(tmp, final):
        pytest.skip("this file system has no RENAME_EXCHANGE")
    assert (final / "data").read_text() == "new" and (tmp / "data").read_text() == "old"
    with megatron_io.atomic_folder(final, overwrite=True) as fresh:
        assert fresh == tmp and not (fresh / "data").exists()  # the stale one was removed
        manifest.write(fresh, _TEST_MANIFEST)
        (fresh / "data").write_text("newer")
    assert (final / "data").read_text() == "newer" and not tmp.exists()


def test_check_target_unit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BTXError, match="current directory"):
        megatron_io.check_target(".", True)
    with pytest.raises(BTXError, match="current directory"):
        megatron_io.check_target("..", True)
    assert megatron_io.check_target("new", False) == Path("new")
