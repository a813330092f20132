"""Rendered sbatch scripts cannot be injected (issue 12, item 2).

Hostile values (a newline in a config string, a CLI flag, an environment variable, a stage name
from a hand-edited plan.json) are refused with one line; legal but odd values (spaces, quotes,
`$`, `$(...)`) give a script that bash accepts, whose #SBATCH options read back intact with
shell quoting, and which, run with a fake `srun` and a fake interpreter, hands every value to
the job exactly as given (and runs none of it)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_slurm_render import bash_n, tiny_plan

from megatron_btx.errors import BTXError
from megatron_btx.pipeline import plan
from megatron_btx.pipeline.slurm import SlurmOptions, render_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "opts, what",
    [
        (dict(partition="gpu\n#SBATCH --nodes=999"), "--partition"),
        (dict(job_prefix="btx\ntouch /tmp/pwned"), "--job-prefix"),
        (dict(env={"NCCL_DEBUG": "WARN\ntouch /tmp/pwned"}), "--env NCCL_DEBUG"),
        (dict(env={"A;touch /tmp/pwned": "1"}), "environment variable name"),
        (dict(extra_sbatch=["--exclusive\ntouch /tmp/pwned"]), "--extra-sbatch"),
        (dict(setup=["module load cuda\rtouch /tmp/pwned"]), "--setup"),
        (dict(account="a\x00b"), "--account"),
    ],
)
def test_hostile_options_are_refused(tmp_path, opts, what):
    stage = tiny_plan(tmp_path)[1]
    with pytest.raises(BTXError, match="control character|environment variable name") as e:
        render_script(stage, tmp_path, SlurmOptions(**opts))
    assert what in str(e.value) and "\n" not in str(e.value)


def test_hostile_stage_values_are_refused(tmp_path):
    merge = tiny_plan(tmp_path)[3]
    merge.argv = [*merge.argv, "--split-chunks\ntouch /tmp/pwned"]  # merge.extra_args
    with pytest.raises(BTXError, match="stage merge: the value .* control character"):
        render_script(merge, tmp_path, SlurmOptions())
    with pytest.raises(BTXError, match="the run directory .* control character"):
        render_script(tiny_plan(tmp_path)[1], tmp_path / "run\nx", SlurmOptions())
    bad = tiny_plan(tmp_path)[1]
    bad.name = "../../x"
    with pytest.raises(BTXError, match="stage name"):
        render_script(bad, tmp_path, SlurmOptions())


@pytest.mark.parametrize("name", ["../escape", "a b", "x\n#SBATCH --nodes=9", "$(id)", ".."])
def test_hand_edited_plan_stage_names_are_refused(tmp_path, name):
    run = tmp_path / "run"
    stages = tiny_plan(run)
    run.mkdir()
    plan.save_plan(run, plan.Plan(stages, None))
    document = json.loads((run / "plan.json").read_text())
    document["stages"][1]["name"] = name
    (run / "plan.json").write_text(json.dumps(document))
    with pytest.raises(BTXError, match="stage name"):
        plan.read_plan(run)
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_btx", "launch", str(run), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error:") and "stage name" in proc.stderr
    assert not (run / "slurm").exists()


def test_launch_refuses_a_newline_in_a_flag(tmp_path):
    run = tmp_path / "run"
    stages = tiny_plan(run)
    run.mkdir()
    plan.save_plan(run, plan.Plan(stages, None))
    for flag in ("--partition", "--job-prefix", "--env"):
        value = "A=x\ny" if flag == "--env" else "gpu\ntouch /tmp/pwned"
        proc = subprocess.run(
            [sys.executable, "-m", "megatron_btx", "launch", str(run), "--dry-run", flag, value],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "control character" in proc.stderr
        assert not (run / "slurm").exists()


ODD = "a b 'q' \"d\" $HOME $(touch {marker}) `touch {marker}` ;&|<>"


def _fakes(tmp_path: Path) -> tuple[Path, Path]:
    """A bin folder with fake srun/scontrol/scancel, and a fake interpreter (its path has a
    space) that records its argv and one environment variable, one JSON line per call."""
    bindir = tmp_path / "fake bin"
    bindir.mkdir()
    log = tmp_path / "calls.jsonl"
    # srun: drop its own options, run the command (as one task on this node)
    (bindir / "srun").write_text(
        '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n'
    )
    (bindir / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    (bindir / "scancel").write_text("#!/bin/bash\nexit 0\n")
    python = bindir / "fake python"
    python.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'env': os.environ.get('BTX_ODD')}) + '\\n')\n"
    )
    for f in bindir.iterdir():
        f.chmod(0o755)
    return bindir, python


@pytest.mark.parametrize("which", [1, 3])  # a multi-node train stage, the merge stage
def test_odd_values_arrive_intact(tmp_path, which):
    marker = tmp_path / "marker"
    odd = ODD.format(marker=marker)
    run = tmp_path / "run dir 'q' $x"
    stage = tiny_plan(run)[which]
    stage.argv = [*stage.argv, odd, "--flag=$(touch " + str(marker) + ")"]
    bindir, python = _fakes(tmp_path)
    workdir = tmp_path / "work dir $y"
    workdir.mkdir()
    opts = SlurmOptions(
        partition="gpu a",
        job_prefix="my job",
        env={"BTX_ODD": odd},
        python=str(python),
        workdir=str(workdir),
        extra_sbatch=["--comment=it's $odd"],
    )
    text = render_script(stage, run, opts)
    bash_n(text, tmp_path)
    sbatch = [
        shlex.split(line[len("#SBATCH ") :])
        for line in text.splitlines()
        if line.startswith("#SBATCH ")
    ]
    assert all(len(words) == 1 for words in sbatch), sbatch
    options = [words[0] for words in sbatch]
    for want in (
        f"--job-name=my job-{stage.name}",
        "--partition=gpu a",
        f"--output={run}/slurm/logs/{stage.name}.%j.out",
        "--comment=it's $odd",
    ):
        assert want in options, (want, options)
    script = tmp_path / "job.sh"
    script.write_text(text)
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "localhost",
    }
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not marker.exists(), "a value ran as a command"
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert all(call["env"] == odd for call in calls)
    helper = calls[0]["argv"]  # the bookkeeping helper, first
    assert helper[:6] == [
        "-m",
        "megatron_btx.pipeline.slurm",
        "--run-dir",
        str(run),
        "--stage",
        stage.name,
    ]
    step = next(
        c["argv"] for c in calls if "megatron_btx" in c["argv"] and stage.argv[0] in c["argv"]
    )
    tail = step[step.index(stage.argv[0]) - 2 :]
    assert tail == ["-m", "megatron_btx", *stage.argv]  # every argument as given
    if which == 1:
        assert step[:4] == ["-m", "megatron_btx.pipeline.slurm", "torchrun", "--nnodes=1"]
        assert "--node-rank=0" in step and "--master-port=20042" in step
    assert (run / "slurm" / "logs" / f"{stage.name}.events").is_file()
