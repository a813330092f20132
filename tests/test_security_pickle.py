"""Checkpoints cannot run code (issue 12, item 1).

A real checkpoint's `.metadata` (a pickle) is given a payload that writes a marker file when it
is unpickled by plain `pickle`, as torch's FileSystemReader does; a training checkpoint's RNG
state (a byte object in a `.distcp`, read by torch's planner with weights_only=False) is given
the same payload. Every command that opens a checkpoint must refuse it with one line and exit
code 2, and the marker must never appear: export-hf, merge, train --model.init_from, train
resume and evaluate. Also: our unpickler reads the metadata every writer produces, and a chunk
that points outside its folder is refused.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402
from cli_contract import btx  # noqa: E402

from megatron_btx.checkpoint import manifest  # noqa: E402
from megatron_btx.errors import BTXError  # noqa: E402


class Payload:
    """Unpickled by plain pickle (or torch.load without weights_only), writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _rerecord(folder: Path, *names: str) -> None:
    """Record the planted files' new sha256 in the manifest, so that what refuses them is the
    unpickler, not the hash check."""
    m = json.loads((folder / manifest.MANIFEST).read_text())
    if "files" in m:
        for name in names:
            m["files"][name] = manifest.sha256_file(folder / name)
        (folder / manifest.MANIFEST).write_text(json.dumps(m))


def plant_metadata(folder: Path, marker: Path) -> None:
    """`.metadata` with the payload inside (the rest of it intact: plain pickle still loads)."""
    md = pickle.loads((folder / ".metadata").read_bytes())  # our own file: trusted here
    md.planner_data = Payload(marker)
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    _rerecord(folder, ".metadata")


def plant_rng_state(folder: Path, marker: Path) -> None:
    """The RNG state object of a training checkpoint replaced by a torch.save'd payload in a
    new data file (the metadata itself stays clean)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md = pickle.loads((folder / ".metadata").read_bytes())
    index = next(k for k in md.storage_data if k.fqn.startswith("rng_state"))
    blob = io.BytesIO()
    torch.save(Payload(marker), blob)
    (folder / "__9_0.distcp").write_bytes(blob.getvalue())
    md.storage_data[index] = _StorageInfo("__9_0.distcp", 0, len(blob.getvalue()))
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    _rerecord(folder, ".metadata", "__9_0.distcp")


def refused(proc: subprocess.CompletedProcess, marker: Path, *unwritten: Path) -> None:
    out = f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert not marker.exists(), "the payload ran\n" + out
    assert proc.returncode == 2, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, out
    assert "refusing" in errors[0] or "refused" in errors[0], errors[0]
    for path in unwritten:
        assert not path.exists(), path


@pytest.fixture
def init_copy(tmp_path, base, data) -> Path:
    """A copy of the step-0 training checkpoint (dense, the training tests' model)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tc.init_checkpoint(base, data), folder)
    return folder


def test_planted_metadata_is_refused_by_export_and_merge(init_copy, tmp_path):
    marker = tmp_path / "marker"
    plant_metadata(init_copy, marker)
    refused(
        btx("export-hf", "--load", str(init_copy), "--save", str(tmp_path / "hf")),
        marker,
        tmp_path / "hf",
    )
    refused(
        btx("merge", "--experts", str(init_copy), str(init_copy), "--save", str(tmp_path / "moe")),
        marker,
        tmp_path / "moe",
    )


def test_planted_metadata_is_refused_by_train_init_from(init_copy, tmp_path, data):
    marker = tmp_path / "marker"
    plant_metadata(init_copy, marker)
    cfg = tc.write_config(tmp_path / "c.yaml", tmp_path / "run", data)
    refused(tc.run(cfg, ["--model.init_from", str(init_copy)]), marker, tmp_path / "run")


@pytest.mark.parametrize("where", ["metadata", "rng_state"])
def test_planted_checkpoint_is_refused_on_resume(tmp_path, base, data, where):
    """A run directory whose latest checkpoint (step 4 of the reference run: model, optimizer
    and RNG states) carries the payload: in `.metadata` (our reader) or in the RNG state object
    (megatron-core's load through our strategy and planner)."""
    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    _, ref_dir = tc.reference_run(base, data)
    folder = run_dir / "checkpoints" / "iter_0000004"
    shutil.copytree(ref_dir / "checkpoints" / "iter_0000004", folder)
    (run_dir / "checkpoints" / "latest").write_text("iter_0000004\n")
    (plant_metadata if where == "metadata" else plant_rng_state)(folder, marker)
    cfg = tc.write_config(tmp_path / "c.yaml", run_dir, data, train={"steps": 6})
    proc = tc.run(cfg)
    refused(proc, marker, run_dir / "checkpoints" / "iter_0000006")
    assert tc.latest(run_dir) == "iter_0000004"


def test_planted_seed_is_refused_by_evaluate(init_copy, tmp_path, data):
    marker = tmp_path / "marker"
    plant_metadata(init_copy, marker)
    run_dir = tc.seed_only_run(tmp_path, data, init_copy)
    refused(
        btx("evaluate", "--run-dir", str(run_dir), "--models", "seed"), marker, run_dir / "eval"
    )


def test_restricted_unpickler_reads_every_writer_and_refuses_paths(init_copy, mg_llama, tmp_path):
    """The metadata of megatron-core's save (a training checkpoint) and of our streaming writer
    (a conversion) read back equal to plain pickle's reading; a chunk whose file is outside the
    folder, and a global that is no metadata class, are one-line errors."""
    from megatron_btx.checkpoint.safe_pickle import load_dcp_metadata

    for folder in (init_copy, mg_llama):
        ours = load_dcp_metadata(folder / ".metadata")
        plain = pickle.loads((folder / ".metadata").read_bytes())
        assert ours.state_dict_metadata == plain.state_dict_metadata
        assert ours.storage_data == plain.storage_data
    md = pickle.loads((init_copy / ".metadata").read_bytes())
    index = next(iter(md.storage_data))
    md.storage_data[index].relative_path = "../../etc/passwd"
    (tmp_path / "escape").write_bytes(pickle.dumps(md))
    with pytest.raises(BTXError, match="outside the checkpoint folder"):
        load_dcp_metadata(tmp_path / "escape")
    (tmp_path / "os").write_bytes(pickle.dumps(__import__("os").getcwd))
    with pytest.raises(BTXError, match=r"refers to (posix|os)\.getcwd"):
        load_dcp_metadata(tmp_path / "os")
