"""Our HF files across transformers versions: what we export loads in transformers 4.x (4.57.1,
whose MoE modules hold one module per expert) with the megatron model's logits, and what 4.x
saves (its own config keys, per-expert tensors) imports with 4.x's logits and exports back
byte-identical. transformers 5.24.0, the pinned one, is covered by the other tests.

4.x runs in a subprocess with an overlay folder first on PYTHONPATH
(`bash scripts/transformers4_overlay.sh`, default `.venv/transformers4`, or `BTX_TRANSFORMERS4`);
without one these tests are skipped, saying how to enable them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_env
from families_common import (
    Runtime,
    V,
    assert_bytes_equal,
    hf_tensors,
    make_hf,
    megatron_logits,
    megatron_model,
)

from megatron_btx.checkpoint.convert import hf_to_megatron, megatron_to_hf

OVERLAY = Path(os.environ.get("BTX_TRANSFORMERS4", ROOT / ".venv" / "transformers4"))
pytestmark = pytest.mark.skipif(
    not (OVERLAY / "transformers").is_dir(),
    reason=f"no transformers 4.x overlay at {OVERLAY}; run scripts/transformers4_overlay.sh",
)
PROBE = Path(__file__).parent / "hf_version_probe.py"
RTOL = 1e-5
ALL = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"]


def with_transformers4(*args: str) -> str:
    """Run the probe under transformers 4.x; returns the version line it printed."""
    env = run_env(PYTHONPATH=f"{OVERLAY}{os.pathsep}{ROOT}")
    result = subprocess.run(
        [sys.executable, str(PROBE), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    version = [ln for ln in result.stderr.splitlines() if ln.startswith("transformers ")][-1]
    assert version.startswith("transformers 4."), version
    return version


def logits4(ids: torch.Tensor, folders: list[Path], tmp: Path) -> dict[str, torch.Tensor]:
    torch.save(ids, tmp / "ids.pt")
    with_transformers4("logits", str(tmp / "ids.pt"), str(tmp / "out.pt"), *map(str, folders))
    return torch.load(tmp / "out.pt", weights_only=True)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(21))


def test_transformers4_checkpoints_import(tmp_path, ids):
    """Every family saved by transformers 4.x: imported, megatron's logits equal 4.x's; the
    export back has 4.x's tensors, byte for byte."""
    folders = []
    for family in ALL:
        with_transformers4("make", family, str(tmp_path / family), "5")
        folders.append(tmp_path / family)
    ref = logits4(ids, folders, tmp_path)
    with Runtime():
        for folder in folders:
            hf_to_megatron(folder, tmp_path / f"{folder.name}_mg")
            ours = megatron_logits(megatron_model(tmp_path / f"{folder.name}_mg"), ids)
            torch.testing.assert_close(ours, ref[str(folder)], rtol=RTOL, atol=RTOL)
    for folder in folders:
        megatron_to_hf(tmp_path / f"{folder.name}_mg", tmp_path / f"{folder.name}_back")
        assert_bytes_equal(hf_tensors(folder), hf_tensors(tmp_path / f"{folder.name}_back"))


def test_exports_load_in_transformers4(tmp_path, ids):
    """Merges of every HF MoE form (Mixtral; Qwen2-MoE with an ungated shared expert, dense
    layer and zero q/k/v biases; Qwen3-MoE) and dense Qwen exports load in transformers 4.x
    with the megatron model's logits."""
    from test_moe_export import branches, merge

    llama = branches(tmp_path, "llama", count=2, num_hidden_layers=2)
    qwen3 = branches(tmp_path, "qwen3", count=2, num_hidden_layers=2)
    cases = {
        "mixtral_split": (llama, {"split_chunks": 2}),
        "qwen2_moe_shared_partial": (llama, {"seed_as_shared_expert": True, "moe_layers": "1"}),
        "qwen3_moe_partial": (qwen3, {"moe_layers": "0"}),
    }
    ckpts, exports = {}, []
    for name, (srcs, settings) in cases.items():
        ckpts[name] = tmp_path / name
        merge(srcs[:2], ckpts[name], seed=srcs[2], export_hf=tmp_path / f"{name}_hf", **settings)
        exports.append(tmp_path / f"{name}_hf")
    for family in ("qwen2", "qwen3"):
        make_hf(family, tmp_path / f"{family}_src")
        hf_to_megatron(tmp_path / f"{family}_src", tmp_path / family)
        megatron_to_hf(tmp_path / family, tmp_path / f"{family}_hf")
        ckpts[family] = tmp_path / family
        exports.append(tmp_path / f"{family}_hf")
    families = {json.loads((e / "config.json").read_text())["model_type"] for e in exports}
    assert families == {"mixtral", "qwen2_moe", "qwen3_moe", "qwen2", "qwen3"}
    ref = logits4(ids, exports, tmp_path)
    with Runtime():
        for name, ckpt in ckpts.items():
            ours = megatron_logits(megatron_model(ckpt), ids)
            torch.testing.assert_close(
                ours, ref[str(tmp_path / f"{name}_hf")], rtol=RTOL, atol=RTOL
            )
