"""TP, PP and EP on CPU (gloo) give the numbers of the single-process run and of `transformers`.

Tolerances (fp32): a layout changes only the order of floating-point sums (TP splits GEMMs and
adds partial results, EP moves tokens but computes the same expert GEMMs), so results agree to a
few ulps of the accumulated values: relative 1e-5 leaves ~100x headroom over the ~1e-7 measured,
and is far below any real bug (a wrong shard or a missing all-reduce changes results at 1e-2).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DIST, LLAMA_KW, run_script

pytestmark = pytest.mark.dist
RTOL = 1e-5


def run_layout(ckpt, batch, tmp_path, nproc=1, **layout) -> dict:
    name = "_".join(f"{k}{v}" for k, v in layout.items()).replace("-", "") or "single"
    out = tmp_path / f"{name}.json"
    args = ["--ckpt", str(ckpt), "--batch", str(batch), "--out", str(out)]
    for k, v in layout.items():
        args += [f"--{k}"] if v is True else [f"--{k}", str(v)]  # True: a flag
    r = run_script(DIST / "equiv.py", args, nproc=nproc)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(out.read_text())
    res["logits"] = torch.load(str(out) + ".logits.pt", weights_only=True)
    return res


def hf_logits(hf_dir, batch) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.load(batch, weights_only=True)[:, :-1]).logits


@pytest.fixture(scope="module")
def dense_ref(mg_llama, batch_file, tmp_path_factory):
    return run_layout(mg_llama, batch_file, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def moe_ref(mg_mixtral, batch_file, tmp_path_factory):
    return run_layout(mg_mixtral, batch_file, tmp_path_factory.mktemp("ref"))


def assert_same(res, ref):
    assert res["loss"] == pytest.approx(ref["loss"], rel=RTOL)
    assert res["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL)
    torch.testing.assert_close(res["logits"], ref["logits"], rtol=RTOL, atol=RTOL)


def test_single_process_matches_transformers(dense_ref, hf_llama, batch_file):
    ref = hf_logits(hf_llama, batch_file)
    assert dense_ref["logits"].shape == (4, 16, LLAMA_KW["vocab_size"])
    torch.testing.assert_close(dense_ref["logits"], ref, rtol=RTOL, atol=RTOL)
    # a random model's loss is near log(V); it must be a real number, not 0 or nan
    assert 4.0 < dense_ref["loss"] < 7.0 and dense_ref["grad_norm"] > 0.1


def test_tp2_pp2_matches_transformers_and_single(
    dense_ref, mg_llama, hf_llama, batch_file, tmp_path
):
    res = run_layout(mg_llama, batch_file, tmp_path, nproc=4, tp=2, pp=2)
    torch.testing.assert_close(res["logits"], hf_logits(hf_llama, batch_file), rtol=RTOL, atol=RTOL)
    assert_same(res, dense_ref)


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}])
def test_tp2_and_pp2_match_single(dense_ref, mg_llama, batch_file, tmp_path, layout):
    assert_same(run_layout(mg_llama, batch_file, tmp_path, nproc=2, **layout), dense_ref)


def test_moe_single_matches_transformers_mixtral(moe_ref, hf_mixtral, batch_file):
    torch.testing.assert_close(
        moe_ref["logits"], hf_logits(hf_mixtral, batch_file), rtol=RTOL, atol=RTOL
    )


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_ep2_matches_single(moe_ref, mg_mixtral, batch_file, tmp_path, dispatcher):
    res = run_layout(mg_mixtral, batch_file, tmp_path, nproc=2, ep=2, dispatcher=dispatcher)
    assert_same(res, moe_ref)


def test_tp2_ep2_sequence_parallel_matches_single(moe_ref, mg_mixtral, batch_file, tmp_path):
    # MoE with TP forces sequence parallel: exercises the SP norm and the uneven all-gather.
    assert_same(run_layout(mg_mixtral, batch_file, tmp_path, nproc=4, tp=2, ep=2), moe_ref)


@pytest.mark.parametrize("layout", [{"ep": 2}, {"tp": 2, "ep": 2}], ids=["ep2", "ep2_etp2"])
def test_grouped_experts_match_single(moe_ref, mg_mixtral, batch_file, tmp_path, layout):
    """The grouped experts (torch._grouped_mm) at EP=2 and at EP=2 x expert-TP=2 (TP=2, ETP
    defaults to TP) give the single-process SequentialMLP run's logits, loss and grad norm."""
    nproc = 2 * layout.get("tp", 1)
    res = run_layout(mg_mixtral, batch_file, tmp_path, nproc=nproc, experts="grouped", **layout)
    assert moe_ref["experts"] == ["SequentialMLP:None"]
    assert res["experts"] == ["GroupedExperts:grouped_mm"]
    assert_same(res, moe_ref)


def test_local_dispatch_matches_alltoall(moe_ref, mg_mixtral, batch_file, tmp_path):
    res = run_layout(
        mg_mixtral, batch_file, tmp_path, experts="grouped", **{"local-dispatch": True}
    )
    assert res["dispatchers"] == ["LocalTokenDispatcher"]
    assert moe_ref["dispatchers"] == ["MoEAlltoAllTokenDispatcher"]
    assert_same(res, moe_ref)
