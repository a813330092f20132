"""One error contract for every command (issue 12, item 9): a user error is one line
``error: ...`` on stderr, exit code 2, no traceback, nothing written. The cases the issue lists:
corrupt manifests, a safetensors header that is a list, --tp 0, a corrupt plan.json or .running
in `btx status`, a full disk in import, export, merge and training (a real one: a tmpfs of a
few hundred KB in a private mount namespace), and `evaluate` of the BTX model alone."""

from __future__ import annotations

import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402
from cli_contract import btx, one_error  # noqa: E402

from megatron_btx.pipeline import plan  # noqa: E402

ROOT = tc.ROOT


# ---- corrupt inputs ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "manifest is corrupt"),
        ("[1, 2]", "not a manifest"),
        ('{"model": "x"}', "model='x' is not a mapping"),
        ('{"model": {}, "moe": {"layer_freq": "all"}}', "moe.layer_freq"),
        ('{"model": {}, "dtype": [1]}', "dtype=[1]"),
    ],
)
def test_corrupt_manifest(mg_llama, tmp_path, text, needle):
    src = tmp_path / "ck"
    shutil.copytree(mg_llama, src)
    (src / "btx_manifest.json").write_text(text)
    one_error(btx("export-hf", "--load", str(src), "--save", str(tmp_path / "hf")), needle)
    one_error(btx("merge", "--experts", str(src), "--save", str(tmp_path / "m")), needle)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m").exists()


def test_safetensors_header_that_is_a_list(hf_llama, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(hf_llama, src)
    header = b"[1, 2, 3]"
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    one_error(btx("import-hf", "--load", str(src), "--save", str(tmp_path / "o")), "is a list")
    assert not (tmp_path / "o").exists()


def test_layout_flags_below_one(hf_llama, mg_llama, tmp_path):
    for flag in ("--tp", "--pp", "--ep"):
        one_error(
            btx("import-hf", "--load", str(hf_llama), "--save", str(tmp_path / "o"), flag, "0"),
            f"{flag} 0 must be >= 1",
        )
        one_error(
            btx("export-hf", "--load", str(mg_llama), "--save", str(tmp_path / "o"), flag, "-1"),
            f"{flag} -1 must be >= 1",
        )
    one_error(
        btx(
            "export-hf",
            "--load",
            str(mg_llama),
            "--save",
            str(tmp_path / "o"),
            "--max-shard-gb",
            "nan",
        ),
        "--max-shard-gb",
    )
    assert not (tmp_path / "o").exists()


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    stages = [
        plan.Stage("a", "data", ["--version"], []),
        plan.Stage("b", "data", ["--help"], ["a"]),
    ]
    plan.save_plan(run, plan.Plan(stages, None))
    return run


@pytest.mark.parametrize(
    "document, needle",
    [
        ("{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ("[]", "another version"),
        ('{"format_version": 3, "stages": {"a": 1}}', "'stages' is not a list"),
        ('{"format_version": 3, "stages": [1]}', "not a mapping"),
        ('{"format_version": 3, "stages": [{"name": "a", "kind": "data", "argv": "x"}]}', "argv"),
        (
            '{"format_version": 3, "stages": [{"name": "a", "kind": "data", "argv": ["x"], '
            '"nproc": "2"}]}',
            "nproc",
        ),
        ('{"format_version": 3, "stages": [], "models": [{"name": "a/b"}]}', "plain name"),
        (
            '{"format_version": 3, "stages": [], "models": [{"name": "m", "kind": "moe", '
            '"role": "btx", "stages": ["nope"]}]}',
            "the plan's stages",
        ),
        ("[" * 100_000, "not valid JSON"),
    ],
)
def test_status_with_a_corrupt_plan(tmp_path, document, needle):
    run = _run_dir(tmp_path)
    path = run / "plan.json"
    path.write_bytes(document if isinstance(document, bytes) else document.encode())
    one_error(btx("status", str(run)), needle)


@pytest.mark.parametrize(
    "record",
    ["{", "[1]", '{"pid": "x", "host": "HOST"}', '{"pid": 1, "start_time": "x", "started": []}'],
)
def test_status_with_a_corrupt_running_or_done_file(tmp_path, record):
    import socket

    run = _run_dir(tmp_path)
    (run / "stages").mkdir()
    (run / "stages" / "a.running").write_text(record.replace("HOST", socket.gethostname()))
    (run / "stages" / "b.done").write_text(record)
    proc = btx("status", str(run))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    states = {line.split()[0]: line.split()[2] for line in proc.stdout.splitlines()[1:-1]}
    assert states["b"] in ("pending", "stale"), proc.stdout  # a marker that is not ours: not done
    assert states["a"] in ("running", "interrupted", "pending"), proc.stdout


def test_evaluate_the_btx_model_alone(tmp_path, base, data):
    """`btx evaluate --models btx` scores one model, with nothing to compare it with (was a
    StopIteration traceback while the report was written). The BTX model here is the step-0
    MoE checkpoint of the training tests, named as the finetune stage's in plan.json."""
    import json

    import yaml

    moe = tc.init_checkpoint(base, data, moe=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {
        "run_dir": str(run_dir),
        "data": {"prepared": str(data), "seq_length": 64},
        "domains": {"code": "builtin", "toy": "builtin"},
        "seed": {"init_from": str(moe)},
        "experts": {"steps": 1},
        "finetune": {"steps": 1},
        "baselines": {"btm": False},
        "evaluation": {"tokens_per_domain": 256, "btm_top_k": [1]},
    }
    (run_dir / "btx.yaml").write_text(yaml.safe_dump(config))
    finetune = plan.Stage(
        "finetune", "train", ["train", "x.yaml"], checkpoint=str(moe), router={"type": "topk"}
    )
    from megatron_btx.pipeline.models import ModelSpec

    btx_model = ModelSpec(
        "btx", "moe", "btx", checkpoint=str(moe), stages=["finetune"], router={"type": "topk"}
    )
    plan.save_plan(run_dir, plan.Plan([finetune], None, [btx_model]))
    proc = btx("evaluate", "--run-dir", str(run_dir), "--models", "btx")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    result = json.loads((run_dir / "eval" / "results.json").read_text())
    assert list(result["models"]) == ["btx"] and "| btx |" in proc.stdout


# ---- a full disk --------------------------------------------------------------------------------
def on_full_disk(
    tmp_path: Path, size_kb: int, command: list[str]
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`command` with `tmp_path/disk` a tmpfs of `size_kb` KB, mounted in a private mount
    namespace (skipped where that is not allowed); returns the process and what is left on the
    disk afterwards."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        f"mount -t tmpfs -o size={size_kb}k tmpfs {shlex.quote(str(disk))} || exit 99\n"
        f"{shlex.join(command)}\nrc=$?\n"
        f"find {shlex.quote(str(disk))} -mindepth 1 > {shlex.quote(str(tmp_path / 'left'))}\n"
        "exit $rc\n"
    )
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        cwd=ROOT,
        env=tc.env(),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode == 99 or "unshare:" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    left = (tmp_path / "left").read_text().split("\n") if (tmp_path / "left").exists() else []
    return proc, [line[len(str(disk)) + 1 :] for line in left if line]


BTX = [sys.executable, "-m", "megatron_btx"]


def test_full_disk_in_import_export_and_merge(hf_llama, mg_llama, tmp_path):
    for name, command in (
        ("import", [*BTX, "import-hf", "--load", str(hf_llama), "--save"]),
        ("export", [*BTX, "export-hf", "--load", str(mg_llama), "--save"]),
        ("merge", [*BTX, "merge", "--experts", str(mg_llama), str(mg_llama), "--save"]),
    ):
        case = tmp_path / name
        case.mkdir()
        proc, left = on_full_disk(case, 200, [*command, str(case / "disk" / "out")])
        one_error(proc, "no space left on the device")
        assert left == [], (name, left)  # the temporary output and the lock are gone


def test_full_disk_in_training(tmp_path, data):
    cfg = tc.write_config(tmp_path / "c.yaml", tmp_path / "disk" / "run", data, train={"steps": 2})
    proc, left = on_full_disk(
        tmp_path, 400, [sys.executable, "-m", "megatron_btx.training", str(cfg)]
    )
    one_error(proc, "no space left on the device")
    assert not [p for p in left if ".tmp" in p or p.endswith(".lock")], left
    assert "run/checkpoints/iter_0000002" not in left
