"""The Slurm executor: one sbatch script per stage of the BTX plan, submitted with dependencies.

Why one job per stage: stages only talk through files under the run directory, so each can run
wherever and whenever Slurm finds nodes. The N expert trainings are independent jobs that start
as soon as nodes are free; the merge waits for all of them (``--dependency=afterok:...``), the
MoE finetune for the merge, the evaluation for everything it scores. A failed stage cancels what
depends on it (``--kill-on-invalid-dep=yes``) instead of leaving it pending forever.

Train stages are multi-node ``srun`` + ``torchrun`` jobs: one srun task per node runs
``torchrun --nnodes $SLURM_NNODES --node-rank $SLURM_NODEID`` with the rendezvous host taken from
``scontrol show hostnames $SLURM_JOB_NODELIST | head -1`` and a port derived from the job id (a
requeued job keeps its id, so its port; two jobs on one node never share one).

Preemption and time limits: the script asks for ``--signal=B:USR1@LEAD`` (Slurm signals the batch
shell LEAD seconds before the end), traps it and forwards USR1 to the job's steps; the trainers
save a checkpoint and exit 0; the script then ``scontrol requeue``\\ s the job, which restarts
with the same id (so dependent jobs keep waiting for it) and resumes from
``checkpoints/latest``. A signal Slurm delivers to the steps directly (``scancel --signal``, a
preemption with PreemptMode=REQUEUE) is handled the same way. torchrun itself is started through
``python -m megatron_btx.pipeline.slurm torchrun`` so that it ignores USR1/TERM (Python's default
for USR1 kills the agent, and its TERM handler kills the workers after 30 s, possibly in the
middle of a checkpoint) while its workers keep the default dispositions and install their own.

A stage is done when the plan's done marker exists (``RUN/stages/<stage>.done``, written at the
end of a successful job by ``python -m megatron_btx.pipeline.slurm --run-dir RUN --stage NAME
finish``, the same marker `btx run` writes, so the two executors can take turns on one run);
``btx launch`` skips done stages and does not resubmit stages whose job from an earlier launch is still queued
or running (``RUN/slurm/jobs.json``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_btx import rundir
from megatron_btx.errors import BTXError

#: squeue states of a job that is still going to run (or running): do not submit it again
LIVE_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
}


@dataclass
class SlurmOptions:
    """What the cluster needs to know beyond the plan (all optional)."""

    partition: str | None = None
    account: str | None = None
    time: str | None = None  # per job, e.g. "2-00:00:00"; preempted/timed-out jobs requeue
    qos: str | None = None
    nodes_per_expert: int = 1  # nodes of every train stage (experts, seed, finetune, baselines)
    stage_nodes: dict[str, int] = field(default_factory=dict)  # per-stage override
    gpus_per_node: int = 0  # 0: request no GPUs (CPU clusters, tests)
    cpus_per_task: int | None = None
    mem: str | None = None
    container_image: str | None = None  # pyxis/enroot: srun --container-image
    container_mounts: str | None = None  # pyxis: srun --container-mounts (apptainer: --bind)
    apptainer: str | None = None  # a .sif: srun apptainer exec [--nv] SIF ...
    extra_sbatch: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. --exclusive
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load ...)
    env: dict[str, str] = field(default_factory=dict)  # exported in every script
    python: str | None = None  # interpreter in the job (default: this one; "python" in containers)
    workdir: str | None = None  # the directory jobs run in (default: the current one)
    job_prefix: str = "btx"
    signal_name: str = "USR1"
    signal_lead: int = 120  # seconds before the time limit the checkpoint signal is sent
    max_requeues: int = 50  # a safety net against a stage that never finishes

    @property
    def in_container(self) -> bool:
        return bool(self.container_image or self.apptainer)

    def interpreter(self) -> str:
        if self.python:
            return self.python
        return "python" if self.in_container else sys.executable

    def cwd(self) -> str:
        return self.workdir or os.getcwd()


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _q(s: str) -> str:
    return shlex.quote(str(s))


#: what ends a line or otherwise changes a script's meaning whatever the quoting: C0 controls,
#: DEL and the Unicode line separators (a newline in a comment or an #SBATCH line starts a
#: command, and ends the #SBATCH options)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIGNAL = re.compile(r"[A-Z0-9]+")


def check_script_text(what: str, value: Any) -> None:
    """Refuse a value bound for a rendered script that contains a control character (one line
    naming `what`); every such value is also shell-quoted where it is used."""
    match = _CONTROL.search(str(value))
    if match:
        raise BTXError(
            f"{what} {str(value)!r} contains the control character {match.group()!r}; it would "
            f"change the sbatch script's meaning, remove it"
        )


def check_options(opts: SlurmOptions) -> None:
    """Every string of the options that reaches a script is free of control characters, an
    environment name is a shell identifier and the signal a signal name."""
    for key in ("partition", "account", "time", "qos", "mem", "container_image", "python"):
        check_script_text(f"--{key.replace('_', '-')}", getattr(opts, key) or "")
    for key in ("container_mounts", "apptainer", "job_prefix"):
        check_script_text(f"--{key.replace('_', '-')}", getattr(opts, key) or "")
    for item in [*opts.extra_sbatch, *opts.setup, *opts.stage_nodes]:
        check_script_text("a --extra-sbatch / --setup / --stage-nodes value", item)
    for name, value in opts.env.items():
        if not _ENV_NAME.fullmatch(name):
            raise BTXError(f"--env {name!r}=...: an environment variable name is A-Z, 0-9 and _")
        check_script_text(f"--env {name}", value)
    if not _SIGNAL.fullmatch(opts.signal_name):
        raise BTXError(f"signal {opts.signal_name!r}: give a signal name such as USR1")
    check_script_text("the working directory", opts.cwd())


def check_stage(stage: Any, run_dir: str) -> None:
    """The stage's name is a plain word (it names files and jobs) and nothing of it that goes
    into the script has a control character."""
    from megatron_btx.pipeline.plan_checks import valid_stage_name

    if not valid_stage_name(stage.name):
        raise BTXError(f"stage name {stage.name!r}: only letters, digits, '_', '.' and '-'")
    check_script_text("the run directory", run_dir)
    for item in [*stage.argv, *stage.deps, *stage.outputs]:
        check_script_text(f"stage {stage.name}: the value", item)


def stage_nodes(stage: Any, opts: SlurmOptions) -> int:
    if stage.name in opts.stage_nodes:
        return int(opts.stage_nodes[stage.name])
    return int(opts.nodes_per_expert) if stage.kind == "train" else 1


def stage_gpus(stage: Any, opts: SlurmOptions) -> int:
    """GPUs per node: train stages take the node's GPUs, evaluation one; data preparation,
    conversion and the merge stream tensors on the CPU."""
    if opts.gpus_per_node <= 0:
        return 0
    if stage.kind == "train":
        return opts.gpus_per_node
    if stage.kind == "eval":
        return 1
    return 0


def _container_prefix(opts: SlurmOptions, gpus: int) -> tuple[list[str], list[str]]:
    """(extra srun options, command prefix) for the container options."""
    if opts.container_image:
        # a named container is created once per node and job and reused by the job's later
        # steps (pyxis removes it when the job ends), instead of unpacking the image each time
        srun = [
            f"--container-image={opts.container_image}",
            f"--container-name={opts.job_prefix}",
            f"--container-workdir={opts.cwd()}",
        ]
        if opts.container_mounts:
            srun.append(f"--container-mounts={opts.container_mounts}")
        return srun, []
    if opts.apptainer:
        pre = ["apptainer", "exec"]
        if gpus:
            pre.append("--nv")
        if opts.container_mounts:
            pre += ["--bind", opts.container_mounts]
        pre += ["--pwd", opts.cwd(), opts.apptainer]
        return [], pre
    return [], []


def _events_line(run_dir: str, stage: str, what: str, **fields: str) -> str:
    """A shell line appending one JSON record to RUN/slurm/logs/<stage>.events (the history of
    a stage's attempts: starts, ends with exit codes, requeues). `fields` are shell
    expressions of numbers."""
    path = f"{run_dir}/slurm/logs/{stage}.events"
    body = '{"event": "%s", "time": %s, "job": "%s", "restart": %s, "host": "%s"'
    args = [
        f'"{what}"',
        '"$(date +%s.%N)"',
        '"$SLURM_JOB_ID"',
        '"${SLURM_RESTART_COUNT:-0}"',
        '"$(hostname)"',
    ]
    for k, v in fields.items():
        body += f', "{k}": %s'
        args.append(f'"{v}"')
    return f"printf '{body}}}\\n' {' '.join(args)} >> {_q(path)}"


def _sbatch_options(stage: Any, logs: str, opts: SlurmOptions, nodes: int, gpus: int) -> list[str]:
    """The script's #SBATCH options."""
    options = [
        f"--job-name={opts.job_prefix}-{stage.name}",
        f"--output={logs}/{stage.name}.%j.out",
        "--open-mode=append",
        "--requeue",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
    ]
    if _preemptible(stage):
        options.append(f"--signal=B:{opts.signal_name}@{opts.signal_lead}")
    if gpus:
        options.append(f"--gpus-per-node={gpus}")
    if opts.cpus_per_task:
        options.append(f"--cpus-per-task={opts.cpus_per_task}")
    if opts.mem:
        options.append(f"--mem={opts.mem}")
    for key in ("partition", "account", "time", "qos"):
        if getattr(opts, key):
            options.append(f"--{key}={getattr(opts, key)}")
    for extra in opts.extra_sbatch:
        options.append(extra if extra.startswith("-") else f"--{extra}")
    return [_q(option) for option in options]  # sbatch reads #SBATCH lines shell-quoted


def _preemptible(stage: Any) -> bool:
    """A train stage that resumes from its checkpoints: checkpoint and requeue on preemption."""
    return stage.kind == "train" and bool(getattr(stage, "resumable", False))


def _signal_trap(opts: SlurmOptions) -> list[str]:
    """On the preemption signal: forward it to the training step (which checkpoints and exits)."""
    return [
        "PREEMPTED=0",
        'STEP_PID=""',
        "on_signal() {",
        '    echo "[btx] $(date -Is) got ' + opts.signal_name + ': checkpointing, then requeueing"',
        "    PREEMPTED=1",
        f'    scancel --signal={opts.signal_name} "$SLURM_JOB_ID" 2>/dev/null'
        f' || kill -{opts.signal_name} "$STEP_PID" 2>/dev/null',
        "}",
        f"trap on_signal {opts.signal_name}",
    ]


def _step(stage: Any, opts: SlurmOptions, nodes: int, gpus: int) -> tuple[list[str], str]:
    """(lines that set up the main step, the step's command line): srun + torchrun across the
    job's nodes for a train stage, one srun task for the others."""
    c_srun, c_pre = _container_prefix(opts, gpus)
    # Resources of the main step, explicitly: since Slurm 22.05 srun no longer inherits
    # --cpus-per-task from the batch job (torchrun's workers would share one CPU).
    step_res = [f"--gpus-per-node={gpus}"] if gpus else []
    if opts.cpus_per_task:
        step_res.append(f"--cpus-per-task={opts.cpus_per_task}")
    py = opts.interpreter()
    if stage.kind != "train":
        srun = ["srun", "--nodes=1", "--ntasks=1", "--kill-on-bad-exit=1", *step_res, *c_srun]
        return [], shlex.join([*srun, *c_pre, py, "-m", "megatron_btx", *stage.argv])
    nproc = max(1, int(getattr(stage, "nproc", 1) or 1))
    # $SLURM_NODEID differs per node: these are expanded inside each srun task, not here; they
    # are ours. Everything else, the stage's arguments above all, is quoted.
    rendezvous = (
        "--nnodes=$SLURM_NNODES --node-rank=$SLURM_NODEID "
        f"--nproc-per-node={nproc} --master-addr=$MASTER_ADDR --master-port=$MASTER_PORT"
    )
    inner_s = (
        f"{shlex.join([py, '-m', 'megatron_btx.pipeline.slurm', 'torchrun'])} {rendezvous} "
        f"{shlex.join(['-m', 'megatron_btx', *stage.argv])}"
    )
    setup = [
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "export MASTER_ADDR MASTER_PORT",
    ]
    srun = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    srun += [*step_res, *c_srun]
    step = f"{shlex.join(srun)} {shlex.join(c_pre) + ' ' if c_pre else ''}bash -c {_q(inner_s)}"
    return setup, step


def _finish_lines(stage: Any, run_dir: str, helper: str, opts: SlurmOptions) -> list[str]:
    """Record the end, report the result to the helper, and requeue or exit by its answer."""
    preemptible = _preemptible(stage)
    end_fields = {"rc": "$RC"}
    if preemptible:
        end_fields["preempted"] = "$PREEMPTED"
    lines = [_events_line(run_dir, stage.name, "end", **end_fields)]
    preempted = '"$PREEMPTED"' if preemptible else "0"
    lines += [
        "# done (0), stopped early and resumable (3: requeue; it resumes from checkpoints/latest),"
        if preemptible
        else "# done (0) or failed (1)",
        *(["# or failed (1)"] if preemptible else []),
        f'{helper} finish --rc "$RC" --started "$STARTED" --preempted {preempted} '
        f"--max-requeues {opts.max_requeues}",
        "case $? in",
        '    0) echo "[btx] $(date -Is) stage ' + stage.name + ' done"; exit 0 ;;',
    ]
    if preemptible:
        lines += [
            "    3)",
            '        echo "[btx] $(date -Is) requeueing job $SLURM_JOB_ID"',
            f"        {_events_line(run_dir, stage.name, 'requeue')}",
            '        scontrol requeue "$SLURM_JOB_ID" && exit 0 ;;',
        ]
    return lines + [
        "esac",
        'echo "[btx] $(date -Is) stage ' + stage.name + ' failed (exit $RC)" >&2',
        'if [ "$RC" -eq 0 ]; then RC=1; fi',
        'exit "$RC"',
    ]


def render_script(stage: Any, run_dir: str | os.PathLike[str], opts: SlurmOptions) -> str:
    """The sbatch script of one stage (a complete bash script; #SBATCH lines first)."""
    run_dir = os.fspath(run_dir)
    check_options(opts)
    check_stage(stage, run_dir)
    nodes = stage_nodes(stage, opts)
    gpus = stage_gpus(stage, opts)
    nproc = max(1, int(getattr(stage, "nproc", 1) or 1))
    if stage.kind == "train" and gpus and nproc > gpus:
        raise BTXError(
            f"stage {stage.name}: runs {nproc} processes per node but --gpus-per-node is {gpus}; "
            f"set the stage's nproc to the GPUs per node (or ask for more GPUs)"
        )
    logs = f"{run_dir}/slurm/logs"
    c_srun, c_pre = _container_prefix(opts, gpus)
    # Bookkeeping (RUN/stages/<stage>.running|.done|.failed, as `btx run` writes them) is done
    # by our package, so inside the container when there is one.
    helper_pre = ["srun", "--nodes=1", "--ntasks=1", *c_srun] if opts.container_image else c_pre
    helper = (
        shlex.join([*helper_pre, opts.interpreter(), "-m", "megatron_btx.pipeline.slurm"])
        + f" --run-dir {_q(run_dir)} --stage {_q(stage.name)}"
    )
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {o}" for o in _sbatch_options(stage, logs, opts, nodes, gpus)]
    lines += [
        f"# btx stage {stage.name} ({stage.kind}): btx {shlex.join(stage.argv)}",
        f"# after: {', '.join(stage.deps) or '-'}; done when: {', '.join(stage.outputs) or '-'}",
        "# Written by `btx launch --executor slurm` (megatron_btx.pipeline.slurm).",
        "set -uo pipefail",
        f"cd {_q(opts.cwd())}",
        "export PYTHONUNBUFFERED=1",
    ]
    lines += [f"export {k}={_q(v)}" for k, v in opts.env.items()]
    lines += list(opts.setup)
    if _preemptible(stage):  # first, so that a signal is never missed
        lines += _signal_trap(opts)
    lines += [
        f"mkdir -p {_q(logs)}",
        "STARTED=$(date +%s.%N)",
        f"{helper} start --pid $$ || true",
        'echo "[btx] $(date -Is) stage ' + stage.name + " job $SLURM_JOB_ID "
        'restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"',
        _events_line(run_dir, stage.name, "start"),
    ]
    setup, step = _step(stage, opts, nodes, gpus)
    lines += setup
    if _preemptible(stage):
        lines += [
            f"{step} &",
            "STEP_PID=$!",
            "# `wait` returns early when the trap runs: wait again until the step has ended",
            'while :; do wait "$STEP_PID"; RC=$?; kill -0 "$STEP_PID" 2>/dev/null || break; done',
        ]
    else:
        lines += [step, "RC=$?"]
    lines += _finish_lines(stage, run_dir, helper, opts)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Submission
# ---------------------------------------------------------------------------------------------
def _run(cmd: Sequence[str]) -> str:
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)
    except FileNotFoundError as e:
        raise BTXError(
            f"{cmd[0]}: not found; run btx launch on a Slurm login node (or use "
            f"--dry-run to only write the scripts)"
        ) from e
    if p.returncode != 0:
        raise BTXError(
            f"{shlex.join(cmd)} failed (exit {p.returncode}): {(p.stderr or p.stdout).strip()}"
        )
    return p.stdout


def job_state(job_id: str) -> str | None:
    """The job's state as squeue reports it, or None once it has left the queue."""
    try:
        p = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    out = p.stdout.strip().splitlines()
    return out[0].strip() if p.returncode == 0 and out else None


def done_stages(stages: Sequence[Any], run_dir: str) -> set[str]:
    """Stages whose results are valid, by the same rule as `btx run` (done marker, unchanged
    command and config, finished after everything it needs)."""
    try:
        from megatron_btx.pipeline.local import done_stages as local_done
    except ImportError:
        from megatron_btx.pipeline.plan import stage_done

        return {s.name for s in stages if stage_done(s, run_dir)}
    return set(local_done(list(stages), run_dir))


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write_text(path, json.dumps(obj, indent=1))


def dependency_graph(stages: Sequence[Any], status: dict[str, str]) -> str:
    """One line per stage: name, kind, job (or 'done'), and what it waits for."""
    width = max((len(s.name) for s in stages), default=5)
    out = []
    for s in stages:
        waits = [d for d in s.deps if status.get(d) != "done"]
        after = f"afterok {', '.join(waits)}" if waits else "-"
        nproc = f" x{s.nproc}" if s.kind == "train" else ""
        out.append(
            f"  {s.name.ljust(width)}  {(s.kind + nproc).ljust(9)} "
            f"{status.get(s.name, '?').ljust(12)} {after}"
        )
    return "\n".join(out)


def launch(
    stages: Sequence[Any],
    run_dir: str | os.PathLike[str],
    opts: SlurmOptions,
    dry_run: bool = False,
    done: Callable[[Any, str], bool] | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, str]:
    """Write RUN/slurm/<stage>.sbatch for every stage not done yet and (unless `dry_run`) submit
    them in plan order with afterok dependencies. Returns stage -> job id ("done" for finished
    stages, "dry-run" for unsubmitted ones); writes RUN/slurm/jobs.json (stage -> job id)."""
    run_dir = os.fspath(Path(run_dir).resolve())
    finished = (
        {s.name for s in stages if done(s, run_dir)} if done else done_stages(stages, run_dir)
    )
    sdir = Path(run_dir) / "slurm"
    jobs_path = sdir / "jobs.json"
    try:
        previous = json.loads(jobs_path.read_text()) if jobs_path.is_file() else {}
    except ValueError:
        previous = {}
    if not dry_run and not shutil.which("sbatch"):
        raise BTXError(
            "sbatch: not found; run btx launch on a Slurm login node (or pass "
            "--dry-run to write and print the scripts only)"
        )
    names = {s.name for s in stages}
    unknown = sorted(set(opts.stage_nodes) - names)
    if unknown:
        raise BTXError(
            f"--stage-nodes {unknown[0]}=...: no such stage (stages: "
            f"{', '.join(s.name for s in stages)})"
        )
    earlier: set[str] = set()
    for s in stages:
        missing = [d for d in s.deps if d not in names]
        if missing:
            raise BTXError(f"stage {s.name} depends on unknown stage(s) {', '.join(missing)}")
        later = [d for d in s.deps if d not in earlier]
        if later:  # jobs are submitted in this order, each after the jobs it needs
            raise BTXError(f"stage {s.name} depends on {later[0]!r}, which comes after it")
        earlier.add(s.name)
    # every script rendered (and so checked) before anything is written or submitted
    texts = {s.name: render_script(s, run_dir, opts) for s in stages if s.name not in finished}
    (sdir / "logs").mkdir(parents=True, exist_ok=True)

    status: dict[str, str] = {}
    scripts: dict[str, Path] = {}
    for s in stages:
        if s.name in finished:
            status[s.name] = "done"
            continue
        text = texts[s.name]
        path = sdir / f"{s.name}.sbatch"
        rundir.atomic_write_text(path, text)
        path.chmod(0o755)
        scripts[s.name] = path
        if dry_run:
            status[s.name] = "dry-run"
            print_fn(f"# ===== {path} =====\n{text}")
            continue
        old = previous.get(s.name)
        if old and job_state(old) in LIVE_STATES:
            status[s.name] = str(old)  # still queued or running from an earlier launch
            continue
        waits = [status[d] for d in s.deps if status[d] != "done"]
        cmd = ["sbatch", "--parsable"]
        if waits:
            cmd += [f"--dependency=afterok:{':'.join(waits)}", "--kill-on-invalid-dep=yes"]
        cmd.append(str(path))
        job = _run(cmd).strip().splitlines()[-1].split(";")[0].strip()
        if not re.fullmatch(r"\d+(_\d+)?", job):
            raise BTXError(f"sbatch returned {job!r}, not a job id")
        status[s.name] = job
        jobs = {k: v for k, v in status.items() if v not in ("done", "dry-run")}
        _write_json(jobs_path, {**previous, **jobs})  # after every submission: never lose an id
    graph = dependency_graph(stages, status)
    print_fn(f"stages of {run_dir} (slurm{', dry run' if dry_run else ''}):\n{graph}")
    if not dry_run:
        jobs = {k: v for k, v in status.items() if v not in ("done", "dry-run")}
        _write_json(jobs_path, {**previous, **jobs})
        print_fn(f"jobs: {jobs_path}   logs: {sdir / 'logs'}")
    return status


# ---------------------------------------------------------------------------------------------
# In-job helpers: `python -m megatron_btx.pipeline.slurm torchrun ...|--run-dir R --stage S ...`
# ---------------------------------------------------------------------------------------------
def _torchrun(argv: list[str]) -> int:
    """torch.distributed.run with USR1/TERM ignored by the agent only (see the module doc)."""
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, _noop)  # a handler, not SIG_IGN: workers get default dispositions
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    from torch.distributed.run import main as torchrun_main

    sys.argv = ["torchrun", *argv]
    try:
        torchrun_main(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except Exception as e:  # noqa: BLE001 - ChildFailedError etc.: already reported by torchrun
        print(f"torchrun: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def _noop(signum, frame) -> None:
    pass


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _attempts(run: Path, stage: str, job: str | None) -> tuple[float | None, float]:
    """(first start, summed run time) of this job's runs, from RUN/slurm/logs/<stage>.events."""
    path = run / "slurm" / "logs" / f"{stage}.events"
    first, busy, start = None, 0.0, None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None, 0.0
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if str(ev.get("job")) != str(job):
            continue
        if ev.get("event") == "start":
            start = float(ev["time"])
            first = start if first is None else min(first, start)
        elif ev.get("event") == "end" and start is not None:
            busy += float(ev["time"]) - start
            start = None
    return first, busy


def _job_helper(argv: list[str]) -> int:
    """``--run-dir RUN --stage NAME start|finish ...``: the stage's bookkeeping files, the same
    ones the local executor writes, so `btx status` and `btx run` see Slurm-run stages."""
    import argparse

    from megatron_btx.pipeline import plan as plan_mod

    p = argparse.ArgumentParser(prog="python -m megatron_btx.pipeline.slurm")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--stage", required=True)
    sub = p.add_subparsers(dest="what", required=True)
    st = sub.add_parser("start")
    st.add_argument("--pid", type=int, default=os.getppid())
    fi = sub.add_parser("finish")
    fi.add_argument("--rc", type=int, required=True)
    fi.add_argument("--started", type=float, default=None, help="epoch seconds")
    fi.add_argument("--preempted", type=int, default=0)
    fi.add_argument("--max-requeues", type=int, default=50)
    a = p.parse_args(argv)
    run = Path(a.run_dir)
    sdir = run / "stages"
    sdir.mkdir(parents=True, exist_ok=True)
    job = os.environ.get("SLURM_JOB_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    try:
        stages = {s.name: s for s in plan_mod.read_plan(run)}
        if a.stage not in stages:
            raise BTXError(f"{run}/plan.json has no stage {a.stage!r}")
    except BTXError as e:
        print(f"[btx] {e}", file=sys.stderr)
        return 1
    stage = stages[a.stage]
    if a.what == "start":
        now = time.time()
        _write_json(
            sdir / f"{stage.name}.running",
            {
                "pid": a.pid,
                "host": socket.gethostname(),
                "started": _iso(now),
                "start_time": now,
                "argv": stage.argv,
                "executor": "slurm",
                "job_id": job,
                "restarts": restarts,
            },
        )
        return 0
    now = time.time()
    started = a.started or now
    first, busy = _attempts(run, stage.name, job)
    if first is not None:  # requeued: the stage's time is that of all its runs
        started = min(started, first)
    seconds = busy if busy else now - started
    (sdir / f"{stage.name}.running").unlink(missing_ok=True)
    complete = a.rc == 0 and not a.preempted and plan_mod.outputs_exist(stage)
    if complete:
        info: dict[str, Any] = {}
        try:
            from megatron_btx.pipeline import local

            info = {"fingerprint": local.fingerprint(stage), **local._train_summary(stage)}
        except (ImportError, AttributeError):  # an older local executor: markers without them
            pass
        plan_mod.mark_done(
            stage,
            run,
            started=_iso(started),
            finished=_iso(now),
            seconds=round(seconds, 2),
            finished_ts=now,
            executor="slurm",
            job_id=job,
            restarts=restarts,
            nodes=os.environ.get("SLURM_JOB_NODELIST", socket.gethostname()),
            **info,
        )
        (sdir / f"{stage.name}.failed").unlink(missing_ok=True)
        return 0
    stopped_early = a.preempted or a.rc == 0
    if stage.resumable and stopped_early and restarts < a.max_requeues:
        return 3
    missing = [o for o in stage.outputs if not os.path.exists(o)]
    why = (
        f"exit code {a.rc}"
        if a.rc
        else f"exited 0 but {missing[0] if missing else '?'} does not exist"
    )
    if stage.resumable and stopped_early:
        why += f" after {restarts} requeues (--max-requeues)"
    _write_json(
        sdir / f"{stage.name}.failed",
        {
            "stage": stage.name,
            "rc": a.rc,
            "reason": why,
            "finished": _iso(now),
            "seconds": round(now - started, 2),
            "executor": "slurm",
            "job_id": job,
            "log": str(run / "slurm" / "logs" / f"{stage.name}.{job}.out"),
        },
    )
    print(f"[btx] stage {stage.name} failed: {why}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "torchrun":
        return _torchrun(argv[1:])
    if argv and argv[0].startswith("--run-dir"):
        return _job_helper(argv)
    print(
        "usage: python -m megatron_btx.pipeline.slurm torchrun TORCHRUN_ARGS...\n"
        "       python -m megatron_btx.pipeline.slurm --run-dir RUN --stage NAME "
        "start|finish ...",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
