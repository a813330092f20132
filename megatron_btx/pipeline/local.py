"""The local executor: run a BTX plan's stages as subprocesses on this machine.

Each stage runs as ``python -m megatron_btx <argv>`` (train stages with ``--nproc-per-node N``
when they want several processes), its output going to ``RUN/logs/<stage>.log`` and, prefixed
with the stage name, to the console. State lives only in files, so any number of interruptions
are harmless:

- ``RUN/stages/<stage>.running``: pid, host and start time while it runs;
- ``RUN/stages/<stage>.done``: written atomically after the exit code is 0 *and* every declared
  output exists (times, steps, tokens, FLOPs); a done stage is never run again;
- ``RUN/stages/<stage>.failed``: exit code and log path of the last failure (cleared on success).

A killed run leaves at most ``.running`` files behind; the next ``btx run`` skips done stages,
re-runs the others, and train stages resume from their ``checkpoints/latest``. A failing stage
does not stop independent ones (the other experts keep training); its dependants are skipped,
the run reports the failures and exits 1, and the next ``btx run`` retries only what is not done.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from megatron_btx import rundir
from megatron_btx.pipeline import plan as plan_mod
from megatron_btx.pipeline.plan import Stage

#: console lines of stage output that are noise (megatron-core start-up warnings)
_NOISE = (
    "WARNING megatron.core",
    "INFO megatron.core",
    "Implicit initialization of Rerun",
    "RerunStateMachine initialized",
    "UserWarning",
    "warnings.warn(",
)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fmt_secs(s: float) -> str:
    s = int(round(s))
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


def stage_command(stage: Stage) -> list[str]:
    cmd = [sys.executable, "-m", "megatron_btx", *stage.argv]
    if stage.kind == "train" and stage.nproc > 1:
        cmd += ["--nproc-per-node", str(stage.nproc)]
    return cmd


class _Running:
    def __init__(self, stage: Stage, proc: subprocess.Popen, log: Path, t0: float) -> None:
        self.stage, self.proc, self.log, self.t0 = stage, proc, log, t0
        self.thread: threading.Thread | None = None
        self.last_line = ""


class LocalExecutor:
    def __init__(
        self,
        stages: list[Stage],
        run_dir: str | os.PathLike[str],
        parallel: int = 1,
        threads: int | None = None,
        quiet: bool = False,
    ) -> None:
        self.stages = stages
        self.by_name = {s.name: s for s in stages}
        self.run = Path(run_dir)
        self.parallel = max(1, parallel)
        self.threads = threads
        self.quiet = quiet
        self.lock = threading.Lock()
        self.priority = critical_path(stages)
        (self.run / "stages").mkdir(parents=True, exist_ok=True)
        (self.run / "logs").mkdir(parents=True, exist_ok=True)

    # ---- console ---------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        with self.lock:
            print(f"[btx run {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def _pump(self, r: _Running) -> None:
        assert r.proc.stdout is not None
        with open(r.log, "ab") as f:
            for raw in iter(r.proc.stdout.readline, b""):
                f.write(raw)
                f.flush()
                line = raw.decode("utf-8", "replace").rstrip()
                r.last_line = line or r.last_line
                if self.quiet or not line or any(n in line for n in _NOISE):
                    continue
                with self.lock:
                    print(f"  [{r.stage.name}] {line}", flush=True)

    # ---- one stage -----------------------------------------------------------------------
    def _threads_for(self, stage: Stage, n_running: int) -> int:
        if self.threads:
            return self.threads
        cpus = os.cpu_count() or 1
        return max(1, cpus // max(1, min(self.parallel, n_running)) // max(1, stage.nproc))

    def _current(self, stage: Stage) -> Stage:
        """The stage as RUN/plan.json has it now: a stage that ran before it (match-compute)
        may have re-planned it (a baseline's steps, hence its final checkpoint)."""
        try:
            fresh = plan_mod.read_plan_file(self.run).by_name().get(stage.name)
        except Exception:  # noqa: BLE001 - no plan file (a test's fake stages): as given
            return stage
        if fresh is None or fresh.argv != stage.argv:
            return stage
        self.by_name[stage.name] = fresh
        self.stages = [fresh if s.name == stage.name else s for s in self.stages]
        return fresh

    def start(self, stage: Stage, n_running: int) -> _Running:
        stage = self._current(stage)
        env = dict(os.environ)
        if "OMP_NUM_THREADS" not in os.environ or self.threads:
            env["OMP_NUM_THREADS"] = str(self._threads_for(stage, n_running))
        env.setdefault("PYTHONWARNINGS", "ignore")
        env["PYTHONUNBUFFERED"] = "1"
        env[rundir.HELD_ENV] = rundir.held_env(self.run)  # the stage writes inside our run
        log = self.run / "logs" / f"{stage.name}.log"
        with open(log, "ab") as f:
            f.write(f"\n==== {_now()} {' '.join(stage_command(stage))}\n".encode())
        t0 = time.time()
        proc = subprocess.Popen(
            stage_command(stage), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        _atomic_json(
            self.run / "stages" / f"{stage.name}.running",
            {
                "pid": proc.pid,
                "host": socket.gethostname(),
                "started": _now(),
                "start_time": t0,
                "argv": stage.argv,
            },
        )
        r = _Running(stage, proc, log, t0)
        r.thread = threading.Thread(target=self._pump, args=(r,), daemon=True)
        r.thread.start()
        what = (
            f"{stage.steps} steps, {plan_mod.fmt_flops(stage.flops)} FLOPs" if stage.steps else ""
        )
        self.say(f"start {stage.name} ({stage.kind}{', ' + what if what else ''}); log {log}")
        return r

    def finish(self, r: _Running, rc: int, interrupted: bool = False) -> bool:
        if r.thread is not None:
            r.thread.join(timeout=10)
        s = r.stage
        dt = time.time() - r.t0
        stages_dir = self.run / "stages"
        (stages_dir / f"{s.name}.running").unlink(missing_ok=True)
        ok = rc == 0 and plan_mod.outputs_exist(s)
        if ok:
            plan_mod.mark_done(
                s,
                self.run,
                started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.t0)),
                finished=_now(),
                seconds=round(dt, 2),
                finished_ts=time.time(),
                fingerprint=fingerprint(s),
                **_train_summary(s),
            )
            (stages_dir / f"{s.name}.failed").unlink(missing_ok=True)
            self.say(f"done  {s.name} in {_fmt_secs(dt)}")
            return True
        if interrupted:  # stopped by our signal: not a failure; the next run resumes it
            self.say(f"stopped {s.name} after {_fmt_secs(dt)} (interrupted)")
            return False
        why = (
            f"exit code {rc}"
            if rc != 0
            else "exited 0 but "
            + next(p for p in s.outputs if not os.path.exists(p))
            + " does not exist (stopped early?)"
        )
        _atomic_json(
            stages_dir / f"{s.name}.failed",
            {
                "stage": s.name,
                "rc": rc,
                "reason": why,
                "finished": _now(),
                "seconds": round(dt, 2),
                "log": str(r.log),
                "last_line": r.last_line,
            },
        )
        self.say(
            f"FAILED {s.name} after {_fmt_secs(dt)}: {why}; last line: {r.last_line!r}; log {r.log}"
        )
        return False

    # ---- the loop ------------------------------------------------------------------------
    def execute(self, only: list[str] | None = None) -> int:
        done = done_stages(self.stages, self.run)
        wanted = [s for s in self.stages if only is None or s.name in only]
        todo = [s for s in wanted if s.name not in done]
        skipped = [s.name for s in wanted if s.name in done]
        if skipped:
            self.say(f"already done: {', '.join(skipped)}")
        if not todo:
            self.say("nothing to do: every stage is done")
            return 0
        self.say(f"to run: {', '.join(s.name for s in todo)} (up to {self.parallel} at a time)")
        for s in todo:  # stale markers of an interrupted run
            (self.run / "stages" / f"{s.name}.running").unlink(missing_ok=True)
        failed: set[str] = set()
        blocked: set[str] = set()
        running: dict[str, _Running] = {}
        t_start = time.time()
        interrupted = False

        def _on_signal(signum, frame):  # forward to the children, then stop
            nonlocal interrupted
            interrupted = True
            for r in running.values():
                try:
                    r.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

        old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while True:
                pending = [
                    s
                    for s in todo
                    if s.name not in done | failed | blocked and s.name not in running
                ]
                for s in pending:
                    if any(d in failed or d in blocked for d in s.deps):
                        blocked.add(s.name)
                        self.say(f"skip  {s.name}: a stage it needs failed")
                if not interrupted:
                    for s in sorted(pending, key=lambda s: -self.priority[s.name]):
                        if len(running) >= self.parallel:
                            break
                        if s.name in blocked:
                            continue
                        if all(d in done for d in s.deps):
                            running[s.name] = self.start(s, len(running) + 1)
                if not running:
                    break
                time.sleep(0.2)
                for name, r in list(running.items()):
                    rc = r.proc.poll()
                    if rc is None:
                        continue
                    del running[name]
                    if self.finish(r, rc, interrupted):
                        done.add(name)
                    else:
                        failed.add(name)
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
        left = [s.name for s in todo if s.name not in done]
        wall = time.time() - t_start
        if interrupted:
            self.say(f"interrupted after {_fmt_secs(wall)}; re-run `btx run` to continue")
            return 130
        if failed or left:
            self.say(
                f"finished in {_fmt_secs(wall)} with failures: {', '.join(sorted(failed))}"
                + (f"; not run: {', '.join(sorted(blocked))}" if blocked else "")
                + ". Re-run `btx run` to retry only these."
            )
            return 1
        self.say(f"all {len(todo)} stage(s) done in {_fmt_secs(wall)}")
        return 0


def critical_path(stages: list[Stage]) -> dict[str, float]:
    """Longest remaining path (in estimated cost) from each stage to the end of the run: ready
    stages start longest-path first, so a long baseline does not end up alone at the end.
    Cost: a train stage's FLOPs (MoE stages weighted 1.5 for their slower tokens), plus a
    constant for start-up."""
    moe = {s.name for s in stages if s.kind == "train" and _is_moe_stage(s)}
    cost = {s.name: 1e9 + s.flops * (1.5 if s.name in moe else 1.0) for s in stages}
    children: dict[str, list[str]] = {s.name: [] for s in stages}
    for s in stages:
        for d in s.deps:
            children.setdefault(d, []).append(s.name)
    prio: dict[str, float] = {}
    for s in reversed(stages):
        prio[s.name] = cost[s.name] + max((prio[c] for c in children[s.name]), default=0.0)
    return prio


def _is_moe_stage(stage: Stage) -> bool:
    from megatron_btx.config import read_yaml
    from megatron_btx.errors import BTXError

    try:
        tc = read_yaml(stage.argv[1])  # no aliases, bounded nesting
        init = (tc.get("model") or {}).get("init_from")
        if init and (Path(init) / "btx_manifest.json").is_file():
            m = json.loads((Path(init) / "btx_manifest.json").read_text())
            return int(m.get("model", {}).get("num_local_experts", 0) or 0) > 0
        return bool(tc.get("moe", {}).get("router"))
    except (BTXError, OSError, ValueError, IndexError, AttributeError, TypeError):
        return False  # a priority hint only: an unreadable config just loses it


def fingerprint(stage: Stage) -> str:
    """What makes a stage's result valid: its command line and, for a train stage, its
    config file's content."""
    import hashlib

    h = hashlib.sha256(json.dumps(stage.argv).encode())
    if stage.kind == "train" and len(stage.argv) > 1 and os.path.isfile(stage.argv[1]):
        h.update(Path(stage.argv[1]).read_bytes())
    return h.hexdigest()[:16]


def is_done(stage: Stage, run_dir: str | os.PathLike[str]) -> bool:
    """Done marker present, outputs exist, and the command (and train config) is unchanged."""
    if not plan_mod.stage_done(stage, run_dir):
        return False
    info = plan_mod.read_marker(stage, run_dir) or {}
    fp = info.get("fingerprint")
    return fp is None or fp == fingerprint(stage)


def done_stages(stages: list[Stage], run_dir: str | os.PathLike[str]) -> set[str]:
    """Stages whose results are valid: done (see :func:`is_done`), every dependency valid, and
    finished after each of them (a redone expert invalidates the merge built from it)."""
    done: set[str] = set()
    when: dict[str, float] = {}
    for s in stages:  # plan order is a topological order
        if not is_done(s, run_dir) or any(d not in done for d in s.deps):
            continue
        t = float((plan_mod.read_marker(s, run_dir) or {}).get("finished_ts", 0.0))
        if t and any(when[d] > t for d in s.deps):
            continue
        done.add(s.name)
        when[s.name] = t
    return done


def _train_summary(stage: Stage) -> dict[str, Any]:
    """Final losses of a train stage, from its metrics.jsonl."""
    if stage.kind != "train" or not stage.workdir:
        return {}
    out: dict[str, Any] = {}
    try:
        with open(Path(stage.workdir) / "metrics.jsonl") as f:
            for line in f:
                ev = json.loads(line)
                if ev.get("event") == "end":
                    out = {"final_loss": ev.get("loss"), "valid_loss": ev.get("valid")}
    except (OSError, ValueError):
        pass
    return out


def _atomic_json(path: Path, obj: Any) -> None:
    rundir.atomic_write_text(path, json.dumps(obj, indent=1))
