"""What a run trusts from its own directory, checked (issue 23, item 1 and the "Silent
corruption", `--out`, plan.json and Unicode-name gaps).

- megatron-core's dataset index cache: a planted pickle in place of an index file ran when a
  copied run resumed (a marker file appeared, then training failed); an index file changed
  after it was written changed the data order silently. Both are refused, the payload never
  runs.
- A flipped byte in the checkpoint `btx train` starts from (init_from, resume) or `btx evaluate`
  scores was loaded with exit 0; the files are now re-hashed against the manifest while they
  load, and `--no-verify-hashes` is the explicit way to skip it.
- `btx evaluate --out` wrote into a checkpoint; a copied run directory was evaluated on the
  original run's checkpoints (plan.json held absolute paths); a Unicode domain name passed
  `btx run` and failed `btx launch`.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402
from cli_contract import btx, one_error  # noqa: E402

from megatron_btx.errors import BTXError  # noqa: E402


class Payload:
    """Unpickled by numpy.load(allow_pickle=True), writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.slow
def test_the_dataset_index_cache_cannot_run_code_or_change_silently(tmp_path, data):
    """A run with its cache in its run directory (the default), then resumed twice: with a
    pickle planted in place of the train split's document index, and with the shuffle index
    replaced by another valid array (a different data order)."""
    run = tmp_path / "run"
    cfg = tc.write_config(tmp_path / "c.yaml", run, data, data={"cache_dir": None})
    tc.check(tc.run(cfg, ["--train.steps", "2"]))
    cache = run / "data_cache"
    document = next(cache.glob("*GPTDataset-train-document_index.npy"))
    shuffle = next(cache.glob("*GPTDataset-train-shuffle_index.npy"))
    original = document.read_bytes()
    marker = tmp_path / "marker"

    document.write_bytes(pickle.dumps(Payload(marker)))
    one_error(tc.run(cfg, ["--train.steps", "2"]), "not a numpy array file")
    assert not marker.exists(), "the planted pickle ran"

    document.write_bytes(original)
    order = np.load(shuffle)
    np.save(shuffle, order[::-1].copy())  # a valid array, another order
    one_error(tc.run(cfg, ["--train.steps", "2"]), "changed since megatron_btx wrote it")


def _flip_a_data_byte(folder: Path) -> None:
    data = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside a tensor's bytes: torch.load reads it without a word
    data.write_bytes(bytes(raw))


@pytest.fixture
def flipped(tmp_path, base, data) -> Path:
    folder = tmp_path / "init"
    shutil.copytree(tc.init_checkpoint(base, data), folder)
    _flip_a_data_byte(folder)
    return folder


@pytest.mark.slow
def test_train_init_from_verifies_the_checkpoint_and_the_flag_skips_it(tmp_path, data, flipped):
    cfg = tc.write_config(tmp_path / "c.yaml", tmp_path / "run", data, train={"steps": 1})
    proc = tc.run(cfg, ["--model.init_from", str(flipped)])
    one_error(proc, "sha256 differs from the manifest's (the file changed); pass --no-verify")
    assert not (tmp_path / "run").exists()
    tc.check(tc.run(cfg, ["--model.init_from", str(flipped), "--no-verify-hashes"]))
    assert tc.latest(tmp_path / "run") == "iter_0000001"


@pytest.mark.slow
def test_train_resume_verifies_the_checkpoint(tmp_path, base, data):
    """The latest checkpoint of a copied run, one byte flipped: the resume refuses it (the
    config key train.verify_hashes: false would load it)."""
    _, ref = tc.reference_run(base, data)
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    _flip_a_data_byte(run / "checkpoints" / tc.latest(run))
    cfg = tc.write_config(tmp_path / "c.yaml", run, data, train={"steps": 10})
    one_error(tc.run(cfg), "sha256 differs from the manifest's")
    assert tc.latest(run) == "iter_0000008"
    tc.check(tc.run(cfg, ["--train.verify_hashes", "false"]))
    assert tc.latest(run) == "iter_0000010"


@pytest.mark.slow
def test_evaluate_verifies_each_checkpoint_and_keeps_out_of_them(tmp_path, data, flipped):
    run = tc.seed_only_run(tmp_path, data, flipped)
    proc = btx("evaluate", "--run-dir", str(run), "--models", "seed")
    one_error(proc, "sha256 differs from the manifest's")
    assert not (run / "eval").exists()
    inner = flipped / "results"
    proc = btx("evaluate", "--run-dir", str(run), "--models", "seed", "--out", str(inner))
    one_error(proc, f"--out {inner}: lies inside the checkpoint {flipped}")
    assert not inner.exists()
    proc = btx("evaluate", "--run-dir", str(run), "--models", "seed", "--no-verify-hashes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seed" in json.loads((run / "eval" / "results.json").read_text())["models"]


def test_a_copied_run_reads_its_own_checkpoints(tmp_path):
    """plan.json records where the run was planned; read from a copy, every path inside the
    run is the copy's (before: the original's checkpoints were evaluated). A moved run is not
    launched until it is planned again (its stages' configs name the old place)."""
    from megatron_btx.pipeline.stages import Plan, Stage, read_plan_file, save_plan

    original, outside = tmp_path / "original", tmp_path / "seed"
    stage = Stage(
        "expert_code",
        "train",
        ["train", str(original / "configs" / "expert_code.yaml")],
        outputs=[str(original / "experts" / "code" / "checkpoints" / "iter_0000004")],
        workdir=str(original / "experts" / "code"),
        checkpoint=str(original / "experts" / "code" / "checkpoints" / "iter_0000004"),
    )
    original.mkdir()
    save_plan(original, Plan([stage], str(outside)))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    plan = read_plan_file(copy)
    (moved,) = plan.stages
    assert moved.checkpoint == str(copy / "experts" / "code" / "checkpoints" / "iter_0000004")
    assert moved.workdir == str(copy / "experts" / "code")
    assert moved.outputs == [moved.checkpoint]
    assert plan.seed_checkpoint == str(outside)  # outside the run: as recorded
    assert plan.moved_from == str(original)
    assert read_plan_file(original).stages[0].checkpoint == stage.checkpoint
    proc = btx("launch", str(copy), "--executor", "slurm", "--dry-run")
    one_error(proc, f"this run was planned in {original} and has moved")
    assert not (copy / "slurm").exists()


def test_one_rule_for_domain_names(tmp_path):
    """`é` passed `btx run` (str.isalnum) and failed `btx launch` (an ASCII stage name)."""
    from megatron_btx.data.domains import prepare_domains
    from megatron_btx.pipeline import config as btx_config

    text = tmp_path / "doc.txt"
    text.write_text("some text\n")
    raw = {"run_dir": str(tmp_path / "run"), "domains": {"é": str(text)}}
    with pytest.raises(BTXError, match="a domain name is ASCII letters"):
        btx_config.load(raw)
    with pytest.raises(BTXError, match="must be ASCII letters"):
        prepare_domains({"é": [text]}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
