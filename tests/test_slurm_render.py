"""The Slurm executor without a cluster: the sbatch scripts it writes (syntax, resources,
dependencies, torchrun rendezvous, preemption trap, container options), submission order and
dependencies against a fake `sbatch`, the in-job bookkeeping helper, and the shipped paper-scale
scripts. Fast: no Slurm, no training."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_btx.pipeline import plan
from megatron_btx.pipeline.plan import Stage, mark_done
from megatron_btx.pipeline.slurm import SlurmOptions, launch, render_script

ROOT = Path(__file__).resolve().parents[1]


def tiny_plan(tmp: Path) -> list[Stage]:
    R = str(tmp)
    return [
        Stage(
            "seed", "train", ["train", f"{R}/configs/seed.yaml"], [], 1, [f"{R}/seed/done"], True
        ),
        Stage(
            "expert_a",
            "train",
            ["train", f"{R}/configs/expert_a.yaml"],
            ["seed"],
            2,
            [f"{R}/a/done"],
            True,
        ),
        Stage(
            "expert_b",
            "train",
            ["train", f"{R}/configs/expert_b.yaml"],
            ["seed"],
            2,
            [f"{R}/b/done"],
            True,
        ),
        Stage(
            "merge",
            "merge",
            ["merge", "--experts", f"{R}/a", f"{R}/b", "--save", f"{R}/m"],
            ["expert_a", "expert_b"],
            1,
            [f"{R}/m/done"],
        ),
        Stage(
            "finetune",
            "train",
            ["train", f"{R}/configs/finetune.yaml"],
            ["merge"],
            2,
            [f"{R}/f/done"],
            True,
        ),
        Stage(
            "evaluate",
            "eval",
            ["evaluate", "--run-dir", R],
            ["finetune", "expert_a"],
            1,
            [f"{R}/eval/results.md"],
        ),
    ]


def bash_n(text: str, tmp: Path) -> None:
    p = tmp / "check.sh"
    p.write_text(text)
    r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def sbatch_opts(text: str) -> list[str]:
    return re.findall(r"^#SBATCH (\S+)$", text, re.M)


def test_train_script_multinode_torchrun_and_preemption(tmp_path):
    st = tiny_plan(tmp_path)[1]
    opts = SlurmOptions(
        partition="gpu",
        account="proj",
        time="2-00:00:00",
        nodes_per_expert=4,
        gpus_per_node=8,
        cpus_per_task=32,
        extra_sbatch=["--exclusive"],
        setup=["module load cuda"],
        env={"NCCL_DEBUG": "WARN"},
        python="/opt/py/bin/python",
        workdir="/shared/w",
    )
    st.nproc = 8
    text = render_script(st, tmp_path, opts)
    bash_n(text, tmp_path)
    o = sbatch_opts(text)
    for want in (
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=32",
        "--partition=gpu",
        "--account=proj",
        "--time=2-00:00:00",
        "--exclusive",
        "--requeue",
        "--open-mode=append",
        "--signal=B:USR1@120",
        "--job-name=btx-expert_a",
    ):
        assert want in o, (want, o)
    assert f"--output={tmp_path}/slurm/logs/expert_a.%j.out" in o
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in text
    # one srun task per node, each a torchrun whose node rank is expanded on its own node
    srun = next(ln for ln in text.splitlines() if ln.startswith("srun --nodes=4"))
    assert "--ntasks-per-node=1" in srun and srun.endswith("&")
    inner = srun.split("bash -c ", 1)[1]
    assert inner.startswith("'") and "--node-rank=$SLURM_NODEID" in inner
    assert "--nnodes=$SLURM_NNODES" in inner and "--nproc-per-node=8" in inner
    assert "-m megatron_btx.pipeline.slurm torchrun" in inner and "megatron_btx train" in inner
    assert "trap on_signal USR1" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert text.index("module load cuda") < text.index("srun --nodes=4")
    assert "export NCCL_DEBUG=WARN" in text and "cd /shared/w" in text


def test_non_train_script_and_containers(tmp_path):
    merge = tiny_plan(tmp_path)[3]
    text = render_script(merge, tmp_path, SlurmOptions(gpus_per_node=8))
    bash_n(text, tmp_path)
    o = sbatch_opts(text)
    assert "--nodes=1" in o and not any(x.startswith("--gpus") for x in o)
    assert not any(x.startswith("--signal") for x in o) and "scontrol requeue" not in text
    assert f"-m megatron_btx merge --experts {tmp_path}/a" in text

    st = tiny_plan(tmp_path)[1]
    pyx = render_script(
        st,
        tmp_path,
        SlurmOptions(
            container_image="nvcr.io#me/btx:0.1.0", container_mounts="/lus:/lus", workdir="/lus/w"
        ),
    )
    bash_n(pyx, tmp_path)
    train = next(ln for ln in pyx.splitlines() if "torchrun" in ln)
    assert "'--container-image=nvcr.io#me/btx:0.1.0'" in train
    assert "--container-mounts=/lus:/lus" in train and "--container-workdir=/lus/w" in train
    assert "bash -c 'python -m megatron_btx.pipeline.slurm torchrun" in train  # image's python
    # the bookkeeping helper runs inside the container too
    assert re.search(
        r"srun --nodes=1 --ntasks=1 '--container-image=\S+' .* python -m "
        r"megatron_btx.pipeline.slurm --run-dir",
        pyx,
    )

    app = render_script(
        st,
        tmp_path,
        SlurmOptions(
            apptainer="/c/btx.sif", gpus_per_node=4, container_mounts="/lus", workdir="/lus/w"
        ),
    )
    bash_n(app, tmp_path)
    train = next(ln for ln in app.splitlines() if "torchrun" in ln)
    assert "apptainer exec --nv --bind /lus --pwd /lus/w /c/btx.sif bash -c" in train


def test_gpus_fewer_than_processes_is_an_error(tmp_path):
    from megatron_btx.errors import BTXError

    st = tiny_plan(tmp_path)[1]
    with pytest.raises(BTXError, match="--gpus-per-node"):
        render_script(st, tmp_path, SlurmOptions(gpus_per_node=1))


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """`sbatch` that records its arguments and answers job ids 101, 102, ...; `squeue` that
    knows no job."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "sbatch.log"
    (bindir / "sbatch").write_text(
        f'#!/bin/bash\necho "$@" >> {log}\nn=$(wc -l < {log})\necho "$((100 + n));cluster"\n'
    )
    (bindir / "squeue").write_text("#!/bin/bash\nexit 0\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_submission_order_dependencies_and_skipping(tmp_path, fake_sbatch):
    run = tmp_path / "run"
    stages = tiny_plan(run)
    # the seed is already done: it is skipped and nothing waits for it
    (run / "seed").mkdir(parents=True)
    (run / "seed" / "done").write_text("")
    mark_done(stages[0], run)
    out: list[str] = []
    status = launch(stages, run, SlurmOptions(), print_fn=out.append)
    assert status == {
        "seed": "done",
        "expert_a": "101",
        "expert_b": "102",
        "merge": "103",
        "finetune": "104",
        "evaluate": "105",
    }
    calls = fake_sbatch.read_text().splitlines()
    assert calls[0] == f"--parsable {run}/slurm/expert_a.sbatch"  # independent of each other
    assert calls[1] == f"--parsable {run}/slurm/expert_b.sbatch"
    assert calls[2].startswith("--parsable --dependency=afterok:101:102 --kill-on-invalid-dep=yes")
    assert "--dependency=afterok:103 " in calls[3]
    assert "--dependency=afterok:104:101 " in calls[4]
    jobs = json.loads((run / "slurm" / "jobs.json").read_text())
    assert jobs == {k: v for k, v in status.items() if v != "done"}
    assert not (run / "slurm" / "seed.sbatch").exists()
    graph = out[-2]
    assert re.search(r"merge\s+merge\s+103\s+afterok expert_a, expert_b$", graph, re.M), graph


def test_dry_run_prints_and_submits_nothing(tmp_path, fake_sbatch):
    run = tmp_path / "run"
    out: list[str] = []
    status = launch(tiny_plan(run), run, SlurmOptions(), dry_run=True, print_fn=out.append)
    assert set(status.values()) == {"dry-run"}
    assert not fake_sbatch.exists() and not (run / "slurm" / "jobs.json").exists()
    text = "\n".join(out)
    assert text.count("#!/bin/bash") == 6 and "afterok expert_a, expert_b" in text


def _helper(run: Path, *args: str, env: dict | None = None) -> int:
    e = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "megatron_btx.pipeline.slurm", "--run-dir", str(run), *args],
        env=e,
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).returncode


def test_job_helper_done_requeue_failed(tmp_path):
    run = tmp_path / "run"
    stages = tiny_plan(run)
    (run).mkdir()
    plan.save_plan(run, plan.Plan(stages, None))
    assert _helper(run, "--stage", "expert_a", "start", "--pid", "123") == 0
    running = json.loads((run / "stages" / "expert_a.running").read_text())
    assert running["pid"] == 123 and running["job_id"] == "7"
    # preempted: resumable -> 3 (requeue); exited 0 before its outputs exist -> also 3
    assert _helper(run, "--stage", "expert_a", "finish", "--rc", "0", "--preempted", "1") == 3
    assert _helper(run, "--stage", "expert_a", "finish", "--rc", "0") == 3
    assert not (run / "stages" / "expert_a.running").exists()
    # ... but not forever
    assert (
        _helper(
            run,
            "--stage",
            "expert_a",
            "finish",
            "--rc",
            "0",
            "--max-requeues",
            "3",
            env={"SLURM_RESTART_COUNT": "3"},
        )
        == 1
    )
    failed = json.loads((run / "stages" / "expert_a.failed").read_text())
    assert "after 3 requeues" in failed["reason"]
    # a crash of a non-resumable stage fails
    assert _helper(run, "--stage", "merge", "finish", "--rc", "2") == 1
    # finished with its outputs: the same done marker `btx run` writes
    (run / "a").mkdir()
    (run / "a" / "done").write_text("")
    assert _helper(run, "--stage", "expert_a", "finish", "--rc", "0", "--started", "100") == 0
    m = json.loads((run / "stages" / "expert_a.done").read_text())
    assert m["argv"] == stages[1].argv and m["executor"] == "slurm" and m["job_id"] == "7"
    assert not (run / "stages" / "expert_a.failed").exists()
    from megatron_btx.pipeline.plan import stage_done

    assert stage_done(stages[1], run)


def test_paper_example_scripts_are_valid(tmp_path):
    """examples/paper_7b/sbatch holds what `btx launch --dry-run` renders for the shipped
    config: valid bash, 4-node 8-GPU experts, the dependency chain of the plan."""
    d = ROOT / "examples" / "paper_7b" / "sbatch"
    scripts = sorted(d.glob("*.sbatch"))
    names = {p.stem for p in scripts}
    assert {
        "expert_math",
        "expert_code",
        "expert_wikipedia",
        "merge",
        "finetune",
        "evaluate",
    } <= names
    for p in scripts:
        bash_n(p.read_text(), tmp_path)
    ex = (d / "expert_code.sbatch").read_text()
    for want in ("--nodes=4", "--gpus-per-node=8", "--signal=B:USR1@120", "--requeue"):
        assert want in sbatch_opts(ex)
    assert "--nproc-per-node=8" in ex and "--container-image=" in ex
    graph = (d / "GRAPH.txt").read_text()
    assert re.search(
        r"^\s+merge\s+merge\s+\S+\s+afterok expert_math, expert_code, "
        r"expert_wikipedia",
        graph,
        re.M,
    )
    assert re.search(r"^\s+finetune\s+train x8\s+\S+\s+afterok merge$", graph, re.M)
    ft = (d / "configs" / "finetune.yaml").read_text()
    assert "aux_loss_coeff: 0.01" in ft and "type: topk" in ft


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_local_script_usage():
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm_local.sh")], capture_output=True, text=True
    )
    assert r.returncode == 2 and "start [DIR]" in r.stdout
