"""``btx launch CONFIG --executor slurm``: submit the whole BTX plan to a cluster.

CONFIG is a BTX run config (the YAML `btx run` takes: see megatron_btx.pipeline.config) or an
existing run directory (its plan.json is used as is). The plan is written under the run
directory first (RUN/plan.json, RUN/configs/*.yaml), then one sbatch script per stage not yet
done goes to RUN/slurm/<stage>.sbatch and is submitted with ``--dependency=afterok`` on the
stages it needs; RUN/slurm/jobs.json maps stage -> job id. Launching again skips finished stages
and keeps jobs that are still queued or running. See megatron_btx.pipeline.slurm for what the
scripts do (srun + torchrun across nodes, checkpoint and requeue on preemption).

Examples::

    btx launch examples/small_btx.yaml --executor slurm --dry-run
    btx launch paper.yaml --executor slurm --partition gpu --account proj --time 2-00:00:00 \\
        --nodes-per-expert 4 --gpus-per-node 8 --container-image nvcr.io#myorg/megatron-btx:0.1.0 \\
        --container-mounts /lustre:/lustre
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_btx import rundir
from megatron_btx.errors import BTXError, run_command


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    k, v = text.split("=", 1)
    return k, v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="btx launch",
        description="Submit the stages of a BTX run as dependent cluster jobs.",
        epilog="Container: --container-image (pyxis/enroot, on srun) or --apptainer SIF "
        "(apptainer exec [--nv] SIF); --container-mounts goes to either.",
    )
    p.add_argument(
        "config",
        help="BTX config YAML, or a run directory with a plan.json; "
        "config overrides follow as --section.key VALUE (as for btx run)",
    )
    p.add_argument(
        "--executor",
        choices=["slurm"],
        default="slurm",
        help="where stages run (local runs: `btx run`)",
    )
    p.add_argument("--run-dir", default=None, help="override the config's run_dir")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="write and print the scripts and the dependency graph; submit nothing",
    )
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", help="time limit per job (jobs checkpoint and requeue at the limit)")
    p.add_argument(
        "--nodes-per-expert",
        type=int,
        default=1,
        help="nodes of each training job (experts, seed, finetune, baselines)",
    )
    p.add_argument(
        "--stage-nodes",
        type=_kv,
        action="append",
        default=[],
        metavar="STAGE=N",
        help="nodes of one stage (e.g. finetune=8)",
    )
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="GPUs per node for training jobs (0: request none)",
    )
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem", default=None, help="memory per node (sbatch --mem)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--container-image", help="pyxis/enroot image for srun --container-image")
    g.add_argument("--apptainer", metavar="SIF", help="run every step in apptainer exec SIF")
    p.add_argument("--container-mounts", help="pyxis --container-mounts / apptainer --bind")
    p.add_argument(
        "--extra-sbatch",
        action="append",
        default=[],
        metavar="OPT",
        help="another #SBATCH option, e.g. --extra-sbatch=--exclusive (repeatable)",
    )
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="SHELL",
        help="a shell line run at the top of every job (e.g. 'module load cuda')",
    )
    p.add_argument(
        "--env",
        type=_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable exported in every job",
    )
    p.add_argument(
        "--python",
        default=None,
        help="the interpreter in the jobs (default: this one; `python` in a container)",
    )
    p.add_argument(
        "--workdir", default=None, help="the directory the jobs run in (default: the current one)"
    )
    p.add_argument(
        "--signal-lead",
        type=int,
        default=120,
        help="seconds before the time limit a training job checkpoints and requeues",
    )
    p.add_argument("--job-prefix", default="btx", help="job names are PREFIX-<stage>")
    return p


def options_from_args(a: argparse.Namespace):
    from megatron_btx.pipeline.slurm import SlurmOptions

    for name, value in (
        ("--nodes-per-expert", a.nodes_per_expert),
        ("--signal-lead", a.signal_lead),
    ):
        if value < 1:
            raise BTXError(f"{name}={value} must be >= 1")
    if a.gpus_per_node < 0:
        raise BTXError(f"--gpus-per-node={a.gpus_per_node} must be >= 0")
    if a.container_mounts and not (a.container_image or a.apptainer):
        raise BTXError("--container-mounts needs --container-image or --apptainer")
    for m in (a.container_mounts or "").split(","):
        parts = m.split(":")
        if len(parts) >= 2 and parts[0] != parts[1]:
            print(
                f"warning: --container-mounts {m}: mounted at another path; the batch scripts "
                f"(outside the container) and the jobs (inside) must see the run directory "
                f"at the same path: mount {parts[0]}:{parts[0]}",
                file=sys.stderr,
            )
    stage_nodes = {}
    for k, v in a.stage_nodes:
        try:
            stage_nodes[k] = int(v)
        except ValueError:
            raise BTXError(f"--stage-nodes {k}={v}: the node count must be an integer") from None
    return SlurmOptions(
        partition=a.partition,
        account=a.account,
        time=a.time,
        qos=a.qos,
        nodes_per_expert=a.nodes_per_expert,
        stage_nodes=stage_nodes,
        gpus_per_node=a.gpus_per_node,
        cpus_per_task=a.cpus_per_task,
        mem=a.mem,
        container_image=a.container_image,
        container_mounts=a.container_mounts,
        apptainer=a.apptainer,
        extra_sbatch=list(a.extra_sbatch),
        setup=list(a.setup),
        env=dict(a.env),
        python=a.python,
        workdir=os.path.abspath(a.workdir) if a.workdir else None,
        job_prefix=a.job_prefix,
        signal_lead=a.signal_lead,
    )


def _run_dir_of(a: argparse.Namespace, rest: list[str]) -> str:
    """The run directory a launch writes (to lock it before the plan is written)."""
    if a.run_dir is not None:
        return a.run_dir
    if Path(a.config).is_dir():
        return a.config
    from megatron_btx.pipeline import config as cfg_mod

    return cfg_mod.load(a.config, rest or None).run_dir


def load_stages(config: str, run_dir: str | None, overrides: list[str] | None = None):
    """(stages, run_dir) from a BTX config (the plan is built and written) or a run dir."""
    from megatron_btx.pipeline import config as cfg_mod
    from megatron_btx.pipeline import plan as plan_mod

    path = Path(config)
    if path.is_dir():
        if run_dir and Path(run_dir).resolve() != path.resolve():
            raise BTXError(f"{config} is a run directory; --run-dir does not apply to it")
        if overrides:
            raise BTXError(
                f"{config} is a run directory; overrides ({overrides[0]} ...) need the BTX config"
            )
        plan = plan_mod.read_plan_file(path)
        if plan.moved_from:  # its stages' configs still name the old place: they would write there
            raise BTXError(
                f"{config}: this run was planned in {plan.moved_from} and has moved; plan it "
                f"again here: btx launch {Path(config) / 'btx.yaml'} --run-dir {config}"
            )
        return plan.stages, str(path.resolve())
    if not path.is_file():
        raise BTXError(f"{config}: no such config file or run directory")
    cfg = cfg_mod.load(str(path), overrides or None)
    rd = str(Path(run_dir if run_dir is not None else cfg.run_dir).resolve())
    stages = plan_mod.build_plan(cfg, rd)
    return stages, rd


def main(argv: list[str] | None = None) -> int:
    a, rest = build_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    bad = [r for r in rest if r.startswith("-") and not r.startswith("--") or r == "--"]
    if bad or (rest and not rest[0].startswith("--")):
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    return run_command(_launch, a, rest)


def _launch(a: argparse.Namespace, rest: list[str]) -> int:
    from megatron_btx.pipeline.slurm import check_options, launch

    opts = options_from_args(a)
    check_options(opts)  # before anything is written
    target = _run_dir_of(a, rest)
    rundir.check_path(target, "the run directory")
    fresh = not os.path.exists(target)
    with rundir.locked(target, "run directory"):
        try:
            stages, run_dir = load_stages(a.config, a.run_dir, rest)
            status = launch(stages, run_dir, opts, dry_run=a.dry_run)
        except BaseException:
            if fresh:  # a refused launch leaves no run directory behind
                _empty(Path(target))
            raise
    if not a.dry_run:
        n = sum(1 for v in status.values() if v not in ("done", "dry-run"))
        print(f"{n} job(s) queued; follow them with `squeue -u $USER` and the logs above")
    return 0


def _empty(folder: Path) -> None:
    """Remove what a failed launch planned into `folder`, which it created (its lock stays for
    rundir.locked to remove with the folder)."""
    import shutil

    for entry in folder.iterdir():
        if entry.name == rundir.LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
