"""The prepared GPU benchmark (benchmarks/gpu_throughput.py) runs end to end in its CPU tiny
mode, so the one device call a GPU session makes does not fail on a typo: every measurement
either gives numbers or an error it recorded, the JSON is complete, the paper model adds up."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT, run_env

pytestmark = pytest.mark.slow


def test_gpu_throughput_tiny_cpu_run(tmp_path, data):
    out = tmp_path / "gt.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/gpu_throughput.py"),
        "--tiny",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--data",
        str(data),
        "--skip",
        "dense_compile,moe_compile",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    res = doc["results"]
    for name in (
        "dense",
        "moe_sequential",
        "moe_grouped",
        "moe_grouped_local",
        "hf_mixtral",
        "hf_llama",
        "paper_dense",
        "paper_moe",
    ):
        assert res[name]["tokens_per_s"] > 0 and "error" not in res[name], (name, res[name])
    assert res["env"]["grouped_mm_unavailable"] is None
    check = res["experts_check"]["fp32"]
    assert check["kernel"] == "grouped_mm" and check["rel_err_output"] < 1e-6
    assert check["zero_token_expert_grad_is_zero"]
    # liger is refused on a CPU run, and the refusal is what the JSON records
    assert "model.kernels=liger" in res["dense_liger"]["error"]
    # top-2: every token enters the experts twice
    assert res["paper_moe"]["expert_rows_per_token_per_layer"] == 2.0
    model = doc["paper_model"]
    hidden, layers = res["paper_moe"]["hidden"], res["paper_moe"]["moe_layers"]
    assert model["a2a_bytes_per_token_leaving_gpu"] == 4 * 2 * hidden * 2 * layers * 3 / 4
    ib = model["links"]["ib_ndr_400g"]
    expected = 1 / (
        1 / res["paper_moe"]["tokens_per_s"] + model["a2a_bytes_per_token_leaving_gpu"] / 50e9
    )
    assert math.isclose(ib["moe_tokens_per_s_per_gpu"], expected, rel_tol=1e-9)
    assert "moe_vs_mixtral>=1.3x" in doc["goals"]
    # same seed and data: the speed-ups train the same model (fp32 here: to 1e-6)
    first = res["moe_sequential"]["losses"][0]
    assert 4.0 < first < 12.0
    for variant in ("moe_grouped", "moe_grouped_local"):
        assert abs(res[variant]["losses"][0] - first) <= 1e-6 * first, variant
        assert float(doc["goals"][f"{variant}_first_loss_rel_diff"]) <= 1e-6
    assert "goal moe_vs_mixtral>=1.3x" in r.stdout
