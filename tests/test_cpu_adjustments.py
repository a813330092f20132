"""Every CPU adjustment in megatron_btx/runtime/cpu.py is needed: switching one off (through
BTX_CPU_SKIP) makes a run that passes with it fail, with the error the adjustment exists for."""

from __future__ import annotations

import pytest
from conftest import DIST, run_env, run_script

from megatron_btx.runtime import cpu

pytestmark = pytest.mark.dist

# adjustment -> (checkpoint fixture, processes, layout args, the error it prevents). Where CUDA is
# reached, the message depends on the torch build: the CPU build says it was not compiled with
# CUDA; a CUDA build (PyPI's, e.g. for Python 3.12 in scripts/test_newest_mcore.sh) on a machine
# without a GPU says it found no driver.
NO_CUDA = ("Torch not compiled with CUDA enabled", "Found no NVIDIA driver")
CASES = {
    "current_device": ("mg_mixtral", 1, [], NO_CUDA),
    "cuda_devices": ("mg_mixtral", 1, [], NO_CUDA),
    "streams": (
        "mg_mixtral",
        1,
        [],
        ("torch.cuda.Stream requires CUDA support", "CUDA driver version is insufficient"),
    ),
    "rng": ("mg_mixtral", 1, [], NO_CUDA),
    "router_gemm": ("mg_mixtral", 1, [], ("te_general_gemm",)),
    "all_to_all_split_sizes": ("mg_mixtral", 2, ["--ep", "2"], ("all_to_all_single",)),
    "uneven_all_gather": ("mg_mixtral", 4, ["--ep", "2", "--tp", "2"], ("allgather",)),
    "sp_norm": (
        "mg_mixtral",
        4,
        ["--ep", "2", "--tp", "2"],
        ("sequence parallel not supported",),
    ),
}


def test_every_adjustment_has_a_case():
    assert set(CASES) == {a.name for a in cpu.ADJUSTMENTS}
    assert all(a.reason for a in cpu.ADJUSTMENTS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_run_fails_without_adjustment(name, request, batch_file, tmp_path):
    stale = cpu.stale_adjustments().get(name)
    if stale:  # apply() reports it instead (tests/test_cpu_stale.py)
        pytest.skip(f"{name} no longer applies on megatron-core {cpu.megatron_core_version()}")
    fixture, nproc, layout, signature = CASES[name]
    ckpt = request.getfixturevalue(fixture)
    args = [
        "--ckpt",
        str(ckpt),
        "--batch",
        str(batch_file),
        "--out",
        str(tmp_path / "r.json"),
        *layout,
    ]
    r = run_script(
        DIST / "equiv.py", args, nproc=nproc, env=run_env(BTX_CPU_SKIP=name), timeout=180
    )
    assert r.returncode != 0, f"{name} removed, yet the run passed"
    assert any(text in r.stdout + r.stderr for text in signature), r.stderr[-2000:]
    assert not (tmp_path / "r.json").exists()


def test_unknown_skip_name_is_refused(monkeypatch):
    monkeypatch.setenv("BTX_CPU_SKIP", "no_such_adjustment")
    with pytest.raises(ValueError, match="no_such_adjustment"):
        cpu.skipped()


def test_adjustments_leave_transformers_untouched(hf_llama, batch_file):
    """The adjustments patch torch process-wide; `transformers` in the same process (the
    evaluation and tests use it) must build and run models exactly as without them."""
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "if sys.argv[1] == '1':\n"
        "    from megatron_btx.runtime import cpu; cpu.apply()\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).eval()\n"
        "b = torch.load(sys.argv[3], weights_only=True)\n"
        "with torch.no_grad(): torch.save(m(b[:, :-1]).logits, sys.argv[4])\n"
    )
    import subprocess
    import sys

    import torch

    outs = []
    for flag in ("0", "1"):
        out = batch_file.parent / f"hf_logits_{flag}.pt"
        r = subprocess.run(
            [sys.executable, "-c", code, flag, str(hf_llama), str(batch_file), str(out)],
            capture_output=True,
            text=True,
            env=run_env(),
        )
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(torch.load(out, weights_only=True))
    assert torch.equal(outs[0], outs[1])
