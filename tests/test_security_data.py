"""Empty splits and failed preparations (issue 12, item 8).

A split that is meant to hold documents (valid or test with a fraction above 0, and train) but
comes out empty fails `btx prepare-data` with one line naming the domain, the split and the
fix, and a failed preparation leaves no tokenizer.model and no manifest behind. A split given
fraction 0 is empty on purpose: training skips validation on it with a warning instead of
crashing in megatron-core ("cannot mmap an empty file")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402


def corpus(path: Path, n: int) -> Path:
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(words[(i + j) % 5] for j in range(80 + i % 40))
            f.write(json.dumps({"id": f"{path.stem}-{i}", "text": text}) + "\n")
    return path


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_btx", "prepare-data", *args],
        cwd=tc.ROOT,
        env=tc.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_empty_valid_split_fails_at_preparation(tmp_path):
    big, small = corpus(tmp_path / "big.jsonl", 300), corpus(tmp_path / "small.jsonl", 5)
    out = tmp_path / "data"
    proc = prepare(
        "--domain",
        f"big={big}",
        "--domain",
        f"small={small}",
        "--output-dir",
        str(out),
        "--vocab-size",
        "400",
        "--split",
        "test=0.05,valid=0.05",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].startswith("error: small: the ") and "split is empty" in errors[0]
    assert "--split" in errors[0]  # how to fix it
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # nothing left (issue 23)


def test_a_failed_preparation_leaves_no_tokenizer(tmp_path):
    """The second domain has no document at all: no tokenizer.model is left, and none of the
    first domain's finished datasets either (they are staged with it)."""
    good = corpus(tmp_path / "good.jsonl", 200)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "data"
    proc = prepare(
        "--domain",
        f"good={good}",
        "--domain",
        f"none={empty}",
        "--output-dir",
        str(out),
        "--vocab-size",
        "400",
    )
    assert proc.returncode == 2 and "no documents found" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "tokenizer.model").exists() and not (out / "manifest.json").exists()
    assert not list(out.glob(".tokenizer*")) and not list(out.glob("good_*"))


def test_training_skips_validation_on_a_split_left_empty_on_purpose(tmp_path):
    data = tmp_path / "data"
    proc = prepare(
        "--domain",
        f"toy={corpus(tmp_path / 'toy.jsonl', 200)}",
        "--output-dir",
        str(data),
        "--vocab-size",
        "400",
        "--split",
        "test=0.05,valid=0",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        json.loads((data / "manifest.json").read_text())["domains"]["toy"]["documents"]["valid"]
        == 0
    )
    cfg = tc.write_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        data,
        data={"domains": ["toy"]},
        train={"steps": 2, "eval_interval": 1},
    )
    run = tc.check(tc.run(cfg))
    assert "domain toy: its valid split is empty; validation skips it" in run.stderr
    assert tc.latest(tmp_path / "run") == "iter_0000002"
