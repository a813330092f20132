"""`btx launch --executor slurm` on a real single-node Slurm (slurm-wlm + munge from Debian,
started by scripts/slurm_local.sh): the whole plan of a tiny BTX run as dependent jobs, expert
trainings under `srun torchrun` with 2 gloo processes each, and an expert preempted midway that
requeues, resumes from its checkpoint and lets the plan finish.

Skipped when CI_SKIP_SLURM=1, or (with the reason) when slurm-wlm/munge cannot be installed.
About 3-4 minutes on 2 cores."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.environ.get("CI_SKIP_SLURM") == "1", reason="CI_SKIP_SLURM=1"),
]


def _free_port_pair() -> int:
    """A port p with p and p+1 free (slurmctld, slurmd), away from the jobs' rendezvous ports
    (20000-39999)."""
    for p in range(41000 + os.getpid() % 4000 * 2, 49000, 2):
        ok = True
        for q in (p, p + 1):
            with socket.socket() as s:
                try:
                    s.bind(("", q))
                except OSError:
                    ok = False
        if ok:
            return p
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node Slurm; yields the environment its clients need."""
    d = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, BTX_SLURM_PORT=str(_free_port_pair()))
    start = subprocess.run(
        ["bash", str(SCRIPT), "start", str(d)], env=env, capture_output=True, text=True, timeout=600
    )
    if start.returncode == 3:
        pytest.skip(f"cannot install slurm-wlm/munge with apt: {start.stderr.strip()[-500:]}")
    assert start.returncode == 0, start.stdout + start.stderr + _tail(d / "log" / "slurmctld.log")
    env = tc.env(SLURM_CONF=str(d / "slurm.conf"))
    try:
        yield env
    finally:
        subprocess.run(
            ["bash", str(SCRIPT), "stop", str(d)], env=env, capture_output=True, timeout=120
        )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tc.prepare_data(tmp_path_factory.getbasetemp())


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text()[-n:]
    except OSError:
        return ""


def btx_config(tmp: Path, data: Path, expert_steps: int, seed: Path | None = None) -> Path:
    """Two domains (code, toy), a seed pretrained for 4 steps (or the given checkpoint), two
    experts of 2 processes each, the merge (seed kept as the third expert), a 4-step MoE
    finetune, the evaluation."""
    cfg = {
        "run_dir": str(tmp / "run"),
        "data": {"prepared": str(data), "seq_length": 64},
        "domains": {"code": "builtin", "toy": "builtin"},
        "model": {} if seed else dict(tc.MODEL),  # a given seed has its own architecture
        "seed": {"init_from": str(seed)}
        if seed
        else {
            "pretrain": {
                "steps": 4,
                "lr": 3e-3,
                "warmup_steps": 1,
                "micro_batch_size": 4,
                "global_batch_size": 8,
            }
        },
        "experts": {
            "steps": expert_steps,
            "lr": 3e-3,
            "warmup_steps": 2,
            "micro_batch_size": 2,
            "global_batch_size": 8,
            "nproc": 2,
            "train": {"save_interval": 4},
        },
        "merge": {"seed_as_expert": True, "top_k": 2},
        "finetune": {
            "steps": 4,
            "lr": 1e-3,
            "warmup_steps": 1,
            "micro_batch_size": 4,
            "global_batch_size": 8,
        },
        "baselines": {
            "dense": False,
            "sparse_upcycling": False,
            "btm": False,
            "compute_match": False,
        },
        "evaluation": {"split": "test", "tokens_per_domain": 256, "btm_top_k": [1]},
        "train": {"log_interval": 1, "eval_iters": 1},
        "logging": {"tensorboard": False},
    }
    path = tmp / "btx.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


STAGES = {"seed", "expert_code", "expert_toy", "merge", "finetune", "evaluate"}


def launch(cfg: Path, env: dict[str, str], stages: set[str] = STAGES) -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_btx", "launch", str(cfg), "--executor", "slurm"],
        cwd=cfg.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (cfg.parent / "run" / "slurm" / "launch.out").write_text(proc.stdout)
    jobs = json.loads((cfg.parent / "run" / "slurm" / "jobs.json").read_text())
    assert set(jobs) == stages
    return jobs


def job_info(job: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait_all(jobs: dict[str, str], env: dict[str, str], run: Path, timeout: float) -> None:
    """Until every job has left the queue; fail early (with the logs) when one failed."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        states = {s: job_info(j, env).get("JobState", "?") for s, j in jobs.items()}
        bad = {
            s: st
            for s, st in states.items()
            if st in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        }
        if bad:
            logs = "\n".join(
                f"--- {p.name}\n{_tail(p)}" for p in sorted((run / "slurm" / "logs").glob("*.out"))
            )
            raise AssertionError(f"jobs failed: {bad}\n{logs}")
        if all(st == "COMPLETED" for st in states.values()):
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s: {states}")


def events(run: Path, stage: str) -> list[dict]:
    path = run / "slurm" / "logs" / f"{stage}.events"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def span(run: Path, stage: str) -> tuple[float, float]:
    """(first start, last end) of a stage's job, from the records its script writes."""
    ev = events(run, stage)
    return (
        min(e["time"] for e in ev if e["event"] == "start"),
        max(e["time"] for e in ev if e["event"] == "end"),
    )


def check_plan_completed(run: Path, jobs: dict[str, str], env: dict[str, str]) -> None:
    for stage, job in jobs.items():
        info = job_info(job, env)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (stage, info)
        marker = json.loads((run / "stages" / f"{stage}.done").read_text())
        assert marker["executor"] == "slurm" and marker["job_id"] == job
    # the dependency graph held: merge after both experts, finetune after merge, eval last
    s = {st: span(run, st) for st in jobs}
    if "seed" in s:
        assert s["expert_code"][0] >= s["seed"][1] and s["expert_toy"][0] >= s["seed"][1]
    assert s["merge"][0] >= max(s["expert_code"][1], s["expert_toy"][1])
    assert s["finetune"][0] >= s["merge"][1]
    assert s["evaluate"][0] >= max(s[x][1] for x in jobs if x != "evaluate")
    # the final table
    table = (run / "eval" / "results.md").read_text()
    for row in ("| seed ", "| expert_code ", "| expert_toy ", "| btx "):
        assert row in table, table
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results


@pytest.mark.long
def test_launch_runs_the_plan(slurm, data, tmp_path):
    """The tiny BTX plan as six dependent jobs: experts are 2-process `srun torchrun` (gloo)
    jobs that run side by side; merge, finetune and evaluation each start after what they need
    has ended; the per-domain table exists. Launching again submits nothing."""
    cfg = btx_config(tmp_path, data, expert_steps=12)
    run = tmp_path / "run"
    t0 = time.time()
    jobs = launch(cfg, slurm)
    wait_all(jobs, slurm, run, timeout=480)
    elapsed = time.time() - t0
    check_plan_completed(run, jobs, slurm)
    for name in ("expert_code", "expert_toy"):
        script = (run / "slurm" / f"{name}.sbatch").read_text()
        assert "srun " in script and "torchrun" in script and "--nproc-per-node=2" in script
        log = (run / "slurm" / "logs" / f"{name}.{jobs[name]}.out").read_text()
        assert "runtime: 2 process(es), backend gloo" in log, log[-3000:]
        assert "training stopped at step 12 (finished)" in log
    # the experts are independent jobs: each waits for the seed only
    graph = (run / "slurm" / "launch.out").read_text()
    for name in ("expert_code", "expert_toy"):
        assert re.search(rf"{name}\s+train x2\s+{jobs[name]}\s+afterok seed$", graph, re.M), graph
    assert re.search(r"merge\s+merge\s+\d+\s+afterok expert_code, expert_toy, seed$", graph, re.M)
    # a second launch finds everything done
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_btx", "launch", str(cfg)],
        cwd=tmp_path,
        env=slurm,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "0 job(s) queued" in proc.stdout, proc.stdout + proc.stderr
    print(f"plan of 6 jobs completed in {elapsed:.0f}s")


@pytest.mark.long
def test_preempted_expert_requeues_and_resumes(slurm, data, tmp_path):
    """USR1 to a running expert job (as Slurm sends before a preemption or the time limit): the
    trainers checkpoint and exit, the job requeues itself, restarts from that checkpoint (step
    > 0) with the same job id, and the rest of the plan still completes."""
    seed = tc.init_checkpoint(data.parent, data)  # an existing seed: no seed stage
    cfg = btx_config(tmp_path, data, expert_steps=30, seed=seed)
    run = tmp_path / "run"
    jobs = launch(cfg, slurm, STAGES - {"seed"})
    latest = run / "experts" / "code" / "checkpoints" / "latest"
    tc.wait_for(latest.is_file, 240, what="the first checkpoint of expert_code")
    job = jobs["expert_code"]
    assert job_info(job, slurm)["JobState"] == "RUNNING"
    subprocess.run(["scancel", "--signal=USR1", "--full", job], env=slurm, check=True)
    wait_all(jobs, slurm, run, timeout=480)
    check_plan_completed(run, jobs, slurm)

    assert job_info(job, slurm)["Restarts"] == "1"
    ev = events(run, "expert_code")
    assert [e["event"] for e in ev] == ["start", "end", "requeue", "start", "end"], ev
    assert ev[1]["preempted"] == 1 and ev[1]["rc"] == 0 and ev[3]["restart"] == 1
    log = (run / "slurm" / "logs" / f"expert_code.{job}.out").read_text()  # --open-mode=append
    m = re.search(r"received SIGUSR1: saving a checkpoint at step (\d+)", log)
    assert m, log[-4000:]
    stopped = int(m.group(1))
    assert 0 < stopped < 30
    assert f"loaded {run}/experts/code/checkpoints/iter_{stopped:07d} (step {stopped})" in log
    assert "training stopped at step 30 (finished)" in log
    # the metrics show the two runs: steps up to the signal, then from there on to 40
    steps = [r["step"] for r in tc.records(run / "experts" / "code", "train")]
    assert steps[:stopped] == list(range(1, stopped + 1))
    assert steps[stopped:] == list(range(stopped + 1, 31)), steps
    ends = tc.records(run / "experts" / "code", "end")
    assert [e["reason"] for e in ends] == ["signal", "finished"]
    marker = json.loads((run / "stages" / "expert_code.done").read_text())
    assert marker["restarts"] == 1
    # its time is that of both runs (the wait in the queue between them not counted)
    both = (ev[1]["time"] - ev[0]["time"]) + (ev[4]["time"] - ev[3]["time"])
    assert marker["seconds"] == pytest.approx(both, abs=0.05)
