"""Merge diagnostics against values worked by hand on checkpoints with planted updates."""

from __future__ import annotations

import math

import pytest
import torch
from test_merge import make_llama

from megatron_btx.eval.diagnostics import merge_retention, parameter_drift


def _with_update(src, dst, direction: dict[str, torch.Tensor], scale: float):
    """A copy of the HF checkpoint `src` whose tensors are src + scale * direction[name]."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    for name, t in tensors.items():
        tensors[name] = t + scale * direction[name]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_drift_cosine_and_kept_by_average_by_hand(tmp_path):
    from safetensors.torch import load_file

    seed = make_llama(tmp_path / "seed", 0)
    base = load_file(str(seed / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    u = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    v = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    # expert a moves along u, b along -u (opposite), c along v (unrelated), each by 0.01
    experts = {
        "a": _with_update(seed, tmp_path / "a", u, 0.01),
        "b": _with_update(seed, tmp_path / "b", u, -0.01),
        "c": _with_update(seed, tmp_path / "c", v, 0.01),
    }
    out = parameter_drift(str(seed), {k: str(p) for k, p in experts.items()})
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    names = [k for k in base if any(a in k for a in attn)]
    seed_norm = math.sqrt(sum(float(base[k].double().square().sum()) for k in names))
    u_norm = math.sqrt(sum(float(u[k].double().square().sum()) for k in names))
    assert out["drift"]["attention"]["a"] == pytest.approx(0.01 * u_norm / seed_norm, rel=1e-4)
    assert out["cosine"]["attention"]["a~b"] == pytest.approx(-1.0, abs=1e-6)
    uv = sum(float((u[k].double() * v[k].double()).sum()) for k in names)
    v_norm = math.sqrt(sum(float(v[k].double().square().sum()) for k in names))
    assert out["cosine"]["attention"]["a~c"] == pytest.approx(uv / (u_norm * v_norm), abs=1e-4)
    # a and b cancel: the average update is c's / 3; its length over the mean length
    mean_len = (2 * u_norm + v_norm) / 3
    assert out["kept_by_average"]["attention"] == pytest.approx(v_norm / 3 / mean_len, rel=1e-3)


def test_merge_retention_by_hand():
    losses = {
        "seed": {"code": 3.0, "math": 2.0},
        "experts": {
            "code": {"code": 2.0},
            "math": {"math": 2.5},  # worse than the seed: no gain to keep
        },
        "merged": {"code": 2.75, "math": 1.9},
    }
    assert merge_retention(losses, ["code", "math"]) == {"code": 0.25, "math": None}
