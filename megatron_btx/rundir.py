"""The run-directory convention every stage shares: checkpoint names, the `latest` pointer,
atomic small-file writes and the lock that keeps two commands out of one folder.

A training run keeps ``RUN/checkpoints/iter_NNNNNNN/`` folders (megatron-core torch_dist plus our
manifest) and a text file ``RUN/checkpoints/latest`` naming the newest complete one. Later stages
(merge, evaluation, the planner) find a run's checkpoint through :func:`resolve_checkpoint`, so
the rule lives here once. Nothing here imports torch: the planner and `btx status` stay light.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from megatron_btx.errors import BTXError

CKPT_DIR = "checkpoints"
LATEST = "latest"
#: megatron-core writes this into every distributed checkpoint folder, last.
MCORE_METADATA = "metadata.json"
ITER_RE = re.compile(r"^iter_(\d{7,})$")
LOCK_NAME = ".btx.lock"
#: set by hold_for_exec: the lock file the launching process holds for this one
LOCK_ENV = "BTX_HELD_LOCK"
#: lock files a parent process holds on behalf of the stages it starts (`btx run`), separated
#: by os.pathsep: a child writing inside them is part of the command that holds them
HELD_ENV = "BTX_HELD_LOCKS"

log = logging.getLogger(__name__)


def iter_name(step: int) -> str:
    """The folder name of the checkpoint saved after `step` optimizer steps."""
    return f"iter_{step:07d}"


def checkpoint_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    """Where a `btx train` run saves its checkpoint of `step`."""
    return Path(run_dir) / CKPT_DIR / iter_name(step)


def is_checkpoint(folder: str | os.PathLike[str]) -> bool:
    """A complete megatron-core distributed checkpoint (its metadata.json is written last)."""
    return (Path(folder) / MCORE_METADATA).is_file()


def read_latest(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint folder `RUN/checkpoints/latest` names, or None when there is none yet."""
    return _latest_in(Path(run_dir) / CKPT_DIR)


def _latest_in(ckpts: Path) -> Path | None:
    latest = ckpts / LATEST
    if not latest.is_file():
        return None
    try:
        name = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise BTXError(f"{latest}: cannot be read ({e}); remove it to start fresh") from e
    folder = ckpts / name
    if not ITER_RE.match(name) or not is_checkpoint(folder):
        raise BTXError(
            f"{latest}: names {name!r}, which is not a complete checkpoint in {ckpts}; "
            f"point it at an existing iter_* folder or remove it to start fresh"
        )
    return folder


def write_latest(run_dir: str | os.PathLike[str], name: str) -> None:
    """Atomically point `latest` at checkpoint `name` (durable before it is visible)."""
    if not ITER_RE.match(name):
        raise ValueError(f"not a checkpoint name: {name!r}")
    atomic_write_text(Path(run_dir) / CKPT_DIR / LATEST, name + "\n", durable=True)


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, folder) of every `iter_*` folder of a run, oldest first."""
    ckpts = Path(run_dir) / CKPT_DIR
    if not ckpts.is_dir():
        return []
    found = []
    for path in ckpts.iterdir():
        match = ITER_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune(run_dir: str | os.PathLike[str], keep_last: int) -> None:
    """Remove all but the newest `keep_last` checkpoints (never the one `latest` names)."""
    latest = Path(run_dir) / CKPT_DIR / LATEST
    keep_name = latest.read_text().strip() if latest.is_file() else None
    found = list_checkpoints(run_dir)
    for _, path in found[:-keep_last] if keep_last > 0 else found:
        if path.name != keep_name:
            shutil.rmtree(path, ignore_errors=True)


def clean_stale(run_dir: str | os.PathLike[str]) -> None:
    """Remove what a killed save left behind: hidden `.NAME.tmp*` / `.NAME.old` folders and
    files in RUN/checkpoints (they are never trusted)."""
    ckpts = Path(run_dir) / CKPT_DIR
    if not ckpts.is_dir():
        return
    for path in ckpts.iterdir():
        if path.name.startswith(".") and (".tmp" in path.name or path.name.endswith(".old")):
            log.warning("removing %s left by an interrupted checkpoint save", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """A checkpoint folder from a checkpoint folder, a `checkpoints` folder or a run directory
    (through its `latest` pointer); None when `path` is none of these."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    for ckpts in (path, path / CKPT_DIR):
        found = _latest_in(ckpts)
        if found is not None:
            return found
    return None


def atomic_write_text(path: str | os.PathLike[str], text: str, durable: bool = False) -> None:
    """Write `text` to `path` through a temporary file renamed into place, so a reader sees
    the old content or the new one, never a part. `durable` fsyncs before the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


#: lock files this process holds: path -> (descriptor, depth); a command that locks its output
#: early (to fail fast) and again where it writes it takes the lock once
_HELD: dict[str, list[int]] = {}


def _drop_held_in_child() -> None:
    """In a process forked from a holder (megatron-core's checkpoint writer forks a helper per
    save), close the inherited lock descriptors: an flock belongs to the open file, so a helper
    outliving a killed holder would otherwise keep the run directory locked against its resume."""
    for fd, _ in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_held_in_child)


def lock_path_beside(path: str | os.PathLike[str]) -> Path:
    """The lock file of an output that is replaced as a whole (a checkpoint folder renamed into
    place): ``.NAME.lock`` beside it, which outlives the folder's replacement."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def locked(
    folder: str | os.PathLike[str],
    what: str = "folder",
    lock_file: str | os.PathLike[str] | None = None,
) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` for the duration.

    The lock is an `flock` on ``FOLDER/.btx.lock`` (created with its folder when missing), or on
    `lock_file` for an output that is replaced as a whole (see :func:`lock_path_beside`); it
    records the holder's pid. The kernel drops it when the holder exits, however it exits, so a
    crash never leaves a stale lock; a clean exit removes the file. A second command on the same
    folder fails at once with one line naming the pid that holds it. Re-entrant within a
    process; the descriptor is inherited by a process exec'd in its place (torchrun, started by
    `btx train --nproc-per-node`), which keeps holding it."""
    folder = Path(folder)
    lock_path = Path(lock_file) if lock_file is not None else folder / LOCK_NAME
    check_path(lock_path, f"the {what}")
    created = not lock_path.parent.exists()
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.abspath(lock_path)
    if key in _inherited():  # held for us by the process that started this one
        yield folder
        return
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield folder
        finally:
            _HELD[key][1] -= 1
        return
    try:
        fd = _acquire(lock_path, folder, what)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                lock_path.parent.rmdir()
        raise
    _HELD[key] = [fd, 1]
    try:
        yield folder
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # while still holding it: see _acquire
        os.close(fd)
        if created:  # a command that failed before writing anything leaves nothing behind
            with contextlib.suppress(OSError):
                lock_path.parent.rmdir()  # only when empty


def hold_for_exec(folder: str | os.PathLike[str], what: str = "folder") -> None:
    """Take `folder`'s lock for a process about to exec another (`btx train --nproc-per-node`
    becoming torchrun): the descriptor survives the exec, so the new program and its children
    hold the lock until they all exit, and :func:`held_by_launcher` tells them so."""
    lock_path = Path(folder) / LOCK_NAME
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock_path, Path(folder), what)
    os.set_inheritable(fd, True)
    os.environ[LOCK_ENV] = os.path.abspath(lock_path)


def held_by_launcher(folder: str | os.PathLike[str]) -> bool:
    """Whether the process that started this one holds `folder`'s lock (:func:`hold_for_exec`)."""
    return os.environ.get(LOCK_ENV) == os.path.abspath(Path(folder) / LOCK_NAME)


def _inherited() -> set[str]:
    """The lock files held for this process by the one that started it."""
    held = {p for p in os.environ.get(HELD_ENV, "").split(os.pathsep) if p}
    if os.environ.get(LOCK_ENV):
        held.add(os.environ[LOCK_ENV])
    return held


def held_env(folder: str | os.PathLike[str]) -> str:
    """The value of :data:`HELD_ENV` for a child process of a command that holds `folder`'s
    lock: the child (a stage of `btx run`) may write inside `folder`."""
    held = _inherited() - {os.environ.get(LOCK_ENV, "")}
    held.add(os.path.abspath(Path(folder) / LOCK_NAME))
    return os.pathsep.join(sorted(held))


def note_holder(folder: str | os.PathLike[str]) -> None:
    """Add this process's pid to `folder`'s lock file, which a process that started it holds
    (:func:`hold_for_exec`): a later refusal names the processes that really hold the lock, even
    when the one that took it has exited and left them running (an orphaned torchrun worker)."""
    with contextlib.suppress(OSError):
        fd = os.open(Path(folder) / LOCK_NAME, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)


@contextlib.contextmanager
def enclosing_locks(path: str | os.PathLike[str], what: str = "output") -> Iterator[None]:
    """Hold the lock of every run directory `path` lies inside (a folder above it whose
    ``.btx.lock`` exists) while the caller writes `path`: a checkpoint inside a run that `btx
    train` holds is never replaced under it, and the run cannot start while it is written. A
    run directory locked by another command is one BTXError naming it and the holder."""
    with contextlib.ExitStack() as stack:
        for parent in reversed(Path(os.path.abspath(path)).parents):
            if (parent / LOCK_NAME).exists():
                stack.enter_context(locked(parent, f"run directory (holding the {what})"))
        yield


def check_path(path: str | os.PathLike[str], what: str = "path") -> None:
    """A path we create files at has no NUL byte and no line break (the operating system
    refuses the first with a traceback-worthy ValueError; the second breaks every log and
    script that names it)."""
    text = os.fspath(path)
    bad = next((c for c in text if c in "\0\n\r"), None)
    if bad is not None:
        raise BTXError(f"{what} {text!r} contains the character {bad!r}; choose another name")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holders(text: str) -> str:
    """Who holds a lock, from its file: the pid that took it and those that noted themselves
    (:func:`note_holder`), the live ones named first."""
    pids = [int(w) for w in text.split() if w.isdigit()]
    if not pids:
        return "pid unknown"
    live = [p for p in pids if pid_alive(p)]
    if not live or live == pids[:1]:
        return f"pid {pids[0]}"
    gone = [p for p in pids if p not in live]
    note = f"; pid {', '.join(map(str, gone))}, which took it, has exited" if gone else ""
    return f"pid {', '.join(map(str, live))}{note}"


def _acquire(lock_path: Path, folder: Path, what: str) -> int:
    """An exclusive flock on `lock_path`, whose file is the one at that path when we hold it (a
    holder that finished may have removed it after we opened it: then open it again)."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holders(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BTXError(f"{lock_path}: cannot lock ({e.strerror})") from None
            raise BTXError(
                f"{folder}: this {what} is in use by another btx command ({holder}); wait "
                f"for it to finish or stop it"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
