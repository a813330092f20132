"""A refused or failed command leaves nothing behind (issue 23, item 6): prepare-data with one
bad domain, `btx launch --dry-run` of a run directory it must refuse, a training run that
crashes before its first checkpoint (fresh, and resumed), and an output whose final rename
fails. Each leaves the disk as it found it and says which path it could not write."""

from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from test_pipeline_plan import _config

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402
from cli_contract import btx, one_error  # noqa: E402

from megatron_btx.errors import BTXError  # noqa: E402


def test_prepare_data_with_one_bad_domain_writes_nothing(tmp_path, data):
    """The good domain's datasets used to stay (and, re-run, looked prepared)."""
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"good {i} " * 30}) + "\n" for i in range(30)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"no": "text field"}\n' * 5)  # no document at all
    out = tmp_path / "prepared"
    proc = btx(
        "prepare-data",
        "--domain",
        f"good={good}",
        "--domain",
        f"bad={bad}",
        "--output-dir",
        str(out),
        "--tokenizer",
        str(data / "tokenizer.model"),
    )
    one_error(proc, "no documents found")
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


def test_launch_refused_for_its_run_directory_writes_nothing(tmp_path):
    """A newline in --run-dir: exit 2, but btx.yaml, configs/, plan.json and slurm/logs were
    written; a plan that fails its checks after planning leaves no run directory either."""
    raw = _config(tmp_path)
    config = tmp_path / "btx.yaml"
    config.write_text(yaml.safe_dump(raw))
    before = sorted(p.name for p in tmp_path.iterdir())
    run = tmp_path / "run\nx"
    proc = btx("launch", str(config), "--executor", "slurm", "--dry-run", "--run-dir", str(run))
    one_error(proc, "contains the character '\\n'")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # planned, then refused by a script check (a control character in a domain's source path)
    name = next(iter(raw["domains"]))
    odd = tmp_path / "odd\tsource"
    shutil.copytree(raw["domains"][name]["source"], odd)
    raw["domains"][name]["source"] = str(odd)
    config.write_text(yaml.safe_dump(raw))
    proc = btx("launch", str(config), "--executor", "slurm", "--dry-run")
    one_error(proc, "control character")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_training_run_that_crashes_leaves_its_run_directory_as_it_was(tmp_path, base, data):
    """Diverging at once (a learning rate of 1e30: the gradients are NaN at the first steps)
    used to leave config.yaml and metrics.jsonl in a new run directory; now there is none. A
    resumed run that crashes before it saves (its data now holds ids outside the vocabulary)
    keeps its history and its config, as they were."""
    run = tmp_path / "fresh"
    cfg = tc.write_config(tmp_path / "c.yaml", run, data, train={"lr": 1e30, "warmup_steps": 0})
    one_error(tc.run(cfg), "not finite")
    assert not run.exists()

    _, ref = tc.reference_run(base, data)
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    metrics = (resumed / "metrics.jsonl").read_bytes()
    config = (resumed / "config.yaml").read_bytes()
    broken = tmp_path / "broken"
    shutil.copytree(data, broken, ignore=shutil.ignore_patterns("index_cache"))
    for path in broken.glob("*_text_document.bin"):
        path.write_bytes(b"\xff" * path.stat().st_size)  # token 65535 everywhere
    cfg = tc.write_config(tmp_path / "r.yaml", resumed, broken, train={"steps": 12})
    one_error(tc.run(cfg), "outside the model's vocabulary of 1024")
    assert (resumed / "metrics.jsonl").read_bytes() == metrics
    assert (resumed / "config.yaml").read_bytes() == config
    assert tc.latest(resumed) == tc.latest(ref)


def test_a_failed_final_rename_removes_its_temporary_folder(tmp_path, monkeypatch):
    """The swap of the finished folder into place fails (the file system refuses it: EPERM, as
    an immutable or foreign-owned parent does); the temporary `.out.tmp` used to stay whole and
    the error line named no path. The old output is kept."""
    from megatron_btx.checkpoint import megatron_io, swap

    out = tmp_path / "out"
    out.mkdir()
    (out / "btx_manifest.json").write_text("{}")

    def refused(first, second):
        raise OSError(errno.EPERM, "Operation not permitted", str(first), None, str(second))

    monkeypatch.setattr(swap, "exchange", refused)
    monkeypatch.setattr(swap.os, "replace", lambda *a: refused(*a))
    with pytest.raises(BTXError, match=f"{out}: the finished output could not be put in place"):
        with megatron_io.atomic_folder(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["btx_manifest.json"]
