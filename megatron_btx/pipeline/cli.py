"""``btx run CONFIG`` (execute a BTX plan locally), ``btx status RUN_DIR`` and
``btx match-compute --run-dir RUN`` (time-match the baselines, then re-plan)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from megatron_btx import rundir
from megatron_btx.errors import BTXError, run_command


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="btx run",
        usage="btx run CONFIG [--parallel N] [--run-dir DIR] [--only STAGE ...] [--dry-run] "
        "[--section.key VALUE ...]",
        description="Run a whole Branch-Train-MiX experiment from one BTX config (see "
        "examples/small_btx.yaml): data, seed, experts, merge, MoE finetune, baselines, "
        "evaluation. Re-running skips finished stages and resumes interrupted ones.",
    )
    p.add_argument("config", help="BTX YAML config")
    p.add_argument("--run-dir", help="override the config's run_dir")
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="stages run at the same time (independent experts/baselines), default 1",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of each stage (default: $OMP_NUM_THREADS, else "
        "CPU cores / running stages)",
    )
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    p.add_argument("--dry-run", action="store_true", help="write and print the plan, run nothing")
    p.add_argument("--quiet", action="store_true", help="no stage output on the console")
    return p


def run_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(_run, argv)


def _run(argv: list[str]) -> int:
    from megatron_btx.pipeline import config as btx_config
    from megatron_btx.pipeline import local, plan

    args, rest = _run_parser().parse_known_args(argv)
    cfg = btx_config.load(args.config, rest or None)
    if args.run_dir is not None:
        cfg.run_dir = args.run_dir
    with rundir.locked(cfg.run_dir, "run directory"):
        return _run_locked(args, cfg, local, plan)


def _run_locked(args: argparse.Namespace, cfg, local, plan) -> int:
    """Plan and execute the run (holding the run directory's lock)."""
    stages = plan.build_plan(cfg, args.run_dir)
    run_dir = cfg.run_dir
    if args.only:
        unknown = [n for n in args.only if n not in {s.name for s in stages}]
        if unknown:
            raise BTXError(
                f"--only {unknown[0]}: no such stage (stages: {', '.join(s.name for s in stages)})"
            )
    print(f"[btx run] plan: {len(stages)} stages in {run_dir} (btx status {run_dir})", flush=True)
    for s in stages:
        extra = (
            f"  {s.steps} steps, {s.tokens:,} tokens, {plan.fmt_flops(s.flops)} FLOPs"
            if s.kind == "train"
            else ""
        )
        dep = f" <- {', '.join(s.deps)}" if s.deps else ""
        print(f"  {s.name:<26} {s.kind:<6}{extra}{dep}", flush=True)
    if args.dry_run:
        for s in stages:
            print(f"btx {' '.join(s.argv)}")
        return 0
    ex = local.LocalExecutor(stages, run_dir, args.parallel, args.threads, args.quiet)
    rc = ex.execute(args.only)
    table = Path(run_dir) / "eval" / "results.md"
    if rc == 0 and table.is_file() and not args.only:
        print("\n" + table.read_text(), flush=True)
    return rc


# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------
def _progress(stage, run_dir: Path) -> str:
    """'step 40/80' from a train stage's metrics.jsonl."""
    if stage.kind != "train" or not stage.workdir:
        return ""
    step = None
    try:
        with open(Path(stage.workdir) / "metrics.jsonl") as f:
            for line in f:
                ev = json.loads(line)
                if isinstance(ev, dict) and ev.get("event") in ("train", "checkpoint", "end"):
                    step = ev.get("step", step)
    except (OSError, ValueError):
        return ""
    return f"step {step}/{stage.steps}" if step is not None else ""


def stage_states(run_dir: str | os.PathLike[str]) -> list[dict]:
    """Each stage's state (done | running | failed | interrupted | pending | stale) and times."""
    import socket

    from megatron_btx.pipeline import local, plan

    run = Path(run_dir)
    stages = plan.read_plan(run)
    valid = local.done_stages(stages, run)
    out = []
    for s in stages:
        stages_dir = run / "stages"
        row = {
            "stage": s.name,
            "kind": s.kind,
            "state": "pending",
            "started": None,
            "seconds": None,
            "flops": s.flops,
            "group": s.group,
            "detail": "",
        }
        marker = plan.read_marker(s, run)
        running = _read(stages_dir / f"{s.name}.running")
        failed = _read(stages_dir / f"{s.name}.failed")
        if s.name in valid and marker:
            row.update(
                state="done",
                started=_text(marker.get("started")),
                seconds=_number(marker.get("seconds")),
            )
        elif running:
            pid = running.get("pid")
            alive = running.get("host") != socket.gethostname() or (
                isinstance(pid, int)
                and not isinstance(pid, bool)
                and pid > 0
                and rundir.pid_alive(pid)
            )
            start_time = _number(running.get("start_time"))
            row.update(
                state="running" if alive else "interrupted",
                started=_text(running.get("started")),
                seconds=None if start_time is None else round(time.time() - start_time, 1),
                detail=_progress(s, run),
            )
        elif failed:
            row.update(
                state="failed",
                seconds=_number(failed.get("seconds")),
                detail=f"{_text(failed.get('reason'))} (log {_text(failed.get('log'))})",
            )
        elif marker:
            row.update(state="stale", detail="done before a stage it needs was redone")
        else:
            row["detail"] = _progress(s, run)
            if row["detail"]:
                row["state"] = "interrupted"
        out.append(row)
    return out


def _number(value) -> float | None:
    """A number from a hand-editable record, or None (a string or list there is not one)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and value == value else None


def _text(value) -> str | None:
    return value if isinstance(value, str) else None if value is None else repr(value)


def _read(path: Path) -> dict | None:
    """A stage's .running / .failed record; None when missing or not a readable JSON object
    (a hand-edited or half-written file is treated as absent)."""
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def status_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="btx status", description="Show each stage of a BTX run.")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    return run_command(_status, args)


def _status(args: argparse.Namespace) -> int:
    from megatron_btx.pipeline import plan

    rows = stage_states(args.run_dir)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        f"{'stage':<26} {'kind':<7} {'state':<12} {'started':<21} {'time':>8} {'FLOPs':>9}  detail"
    )
    for r in rows:
        secs = "" if r["seconds"] is None else f"{float(r['seconds']):.0f}s"
        print(
            f"{r['stage']:<26} {r['kind']:<7} {r['state']:<12} {r['started'] or '':<21} "
            f"{secs:>8} {plan.fmt_flops(r['flops']):>9}  {r['detail']}"
        )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def match_compute_main(argv: list[str] | None = None) -> int:
    """``btx match-compute --run-dir RUN``: measure the BTX stages' hardware time
    (:func:`megatron_btx.pipeline.compute_match.measure`), write RUN/compute_match.json, re-plan."""
    parser = argparse.ArgumentParser(
        prog="btx match-compute",
        description="Time-match the baselines of a BTX run to the hardware time its BTX stages "
        "took (baselines.compute_match: time): writes RUN/compute_match.json and re-plans.",
    )
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    from megatron_btx.pipeline import compute_match
    from megatron_btx.pipeline import plan as plan_mod

    try:
        run = Path(args.run_dir).resolve()
        result = compute_match.measure(run)
        rundir.atomic_write_text(run / compute_match.RESULT, json.dumps(result, indent=1))
        plan_mod.build_plan(run / "btx.yaml", run)
    except BTXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, entry in result["baselines"].items():
        print(f"{name}: {entry['steps']} steps for {result['btx_core_seconds']:.0f} core-seconds")
    return 0
