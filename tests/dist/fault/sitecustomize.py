"""Fault injection for the tests, outside the package: a process started with this folder on
PYTHONPATH and ``BTX_TEST_KILL_IN_SAVE=STEP`` SIGKILLs itself in the middle of writing training
checkpoint STEP: its tensors are written, its files are being hashed for the manifest, and the
folder (``.iter_STEP.tmp``) is not yet renamed into place (tests/test_train_runs.py)."""

import os

_STEP = os.environ.get("BTX_TEST_KILL_IN_SAVE")

if _STEP:
    import signal
    from pathlib import Path

    from megatron_btx.checkpoint import integrity

    _target = f".iter_{int(_STEP):07d}.tmp"
    _hash_tree = integrity.hash_tree

    def _killing_hash_tree(folder, *args, **kwargs):
        hashes = _hash_tree(folder, *args, **kwargs)
        if Path(folder).name == _target:
            os.kill(os.getpid(), signal.SIGKILL)
        return hashes

    integrity.hash_tree = _killing_hash_tree
