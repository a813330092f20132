"""``btx train CONFIG [--resume|--no-resume] [--nproc-per-node N] [--section.key VALUE ...]``.

Run it under ``torchrun`` for several processes (``torchrun --nproc-per-node 4 -m
megatron_btx.training CONFIG ...`` or ``torchrun $(which btx) train CONFIG ...``), or pass
``--nproc-per-node N`` to have it start ``torchrun --standalone`` itself. Without either it is
one process. Exit code 0 when training finished, stopped at ``train.exit_after`` or was preempted
by SIGTERM/SIGUSR1 (after saving a checkpoint); 2 on a configuration or data error, a full disk
or another command holding the run directory (one line on stderr, no traceback). The run
directory is locked for the whole run (:func:`megatron_btx.rundir.locked`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys

from megatron_btx import rundir
from megatron_btx.errors import run_command

USAGE = (
    "btx train CONFIG [--resume | --no-resume] [--nproc-per-node N] [--print-config] "
    "[--no-verify-hashes] [--section.key VALUE ...]"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="btx train",
        usage=USAGE,
        description="Train a dense Llama or a Llama MoE with megatron-core (see "
        "megatron_btx.config for every key). Overrides: --train.lr 3e-4 --parallel.tp 2 ...",
    )
    p.add_argument("config", help="YAML config file")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--resume",
        dest="resume",
        action="store_const",
        const=True,
        default=None,
        help="continue from RUN/checkpoints/latest (error if there is none)",
    )
    g.add_argument(
        "--no-resume",
        dest="resume",
        action="store_const",
        const=False,
        help="start fresh (error if the run directory already has checkpoints)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="start this many processes with torchrun --standalone",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    p.add_argument(
        "--no-verify-hashes",
        dest="verify_hashes",
        action="store_false",
        default=None,
        help="do not re-hash the checkpoint it loads (init_from, resume) against its manifest "
        "(train.verify_hashes: false)",
    )
    return p


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        if rank == 0
        else f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    # megatron-core logs its whole config at INFO: keep the console to our progress lines.
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _relaunch(nproc: int, argv: list[str]) -> int:
    """Replace this process by ``torchrun --standalone --nproc-per-node N`` running us."""
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    rest = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc-per-node":
            skip = True
            continue
        if a.startswith("--nproc-per-node="):
            continue
        rest.append(a)
    cmd = [
        torchrun,
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_btx.training",
        *rest,
    ]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    return run_command(_main, argv, quiet=rank != 0)


def _main(argv: list[str]) -> int:
    from megatron_btx import config as config_mod

    args, rest = _parser().parse_known_args(argv)
    cfg = config_mod.load(args.config, rest)
    if args.resume is not None:
        cfg.train.resume = args.resume
    if args.verify_hashes is not None:
        cfg.train.verify_hashes = args.verify_hashes
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ and args.nproc_per_node > 1:
        rundir.hold_for_exec(cfg.run_dir, "run directory")  # torchrun inherits the lock
        return _relaunch(args.nproc_per_node, argv)
    _setup_logging()
    from megatron_btx.training.loop import train

    with _run_lock(cfg.run_dir):
        train(cfg)
    return 0


def _run_lock(run_dir: str):
    """The run directory's lock, held by one process of the job: the launcher that exec'd
    torchrun holds it for all ranks (`--nproc-per-node`); under an external torchrun, rank 0
    takes it, and if another command holds it, rank 0's one-line error ends the job (torchrun
    stops the other ranks)."""
    if rundir.held_by_launcher(run_dir):
        rundir.note_holder(run_dir)  # a refusal then names this worker, not only the launcher
        return contextlib.nullcontext()
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return rundir.locked(run_dir, "run directory")


if __name__ == "__main__":
    sys.exit(main())
