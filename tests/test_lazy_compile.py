"""megatron-core's import-time torch.compile calls are deferred to first use (megatron_btx.lazy_compile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from megatron_btx import lazy_compile

_PROBE = """
import json, sys, gc
import torch
from megatron_btx import lazy_compile
lazy_compile.install()  # what every btx command does first
import megatron.core
from megatron.core.fusions import fused_bias_swiglu as f
print(json.dumps({
    "dynamo": "torch._dynamo" in sys.modules,
    "deferred": bool(getattr(f.swiglu, "__btx_deferred_compile__", False)),
    "compile_restored": torch.compile.__module__ == "torch",
    "gc_enabled": gc.isenabled(),
    "frozen": gc.get_freeze_count(),
}))
"""


def _probe(env_extra: dict[str, str]) -> dict:
    env = {**os.environ, **env_extra}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_megatron_import_skips_dynamo_and_restores_torch_compile():
    got = _probe({})
    assert got == {
        **got,
        "dynamo": False,
        "deferred": True,
        "compile_restored": True,
        "gc_enabled": True,
    }
    assert got["frozen"] > 10000  # the import's objects moved out of the collector's way
    # the ablation: megatron-core imported untouched compiles (imports TorchDynamo) at import
    plain = _probe({"BTX_LAZY_COMPILE": "0"})
    assert plain["dynamo"] is True and plain["deferred"] is False


def test_deferred_compiles_once_with_the_same_arguments_at_first_call():
    calls = []

    def real(fn, **kw):
        calls.append(kw)
        return lambda *a, **k: fn(*a, **k) * 10

    def f(x, y=1):
        """doc"""
        return x + y

    g = lazy_compile.deferred(real, f, {"mode": "max-autotune", "dynamic": False})
    assert calls == [] and g.__name__ == "f" and g.__doc__ == "doc"
    assert g(1, y=2) == 30 and g(2) == 30
    assert calls == [{"mode": "max-autotune", "dynamic": False}]


def test_deferring_compile_defers_functions_only_and_restores():
    real = torch.compile
    mod = torch.nn.Linear(2, 2)
    with lazy_compile.deferring_compile():
        fn = torch.compile(lambda x: x + 1)
        dec = torch.compile(dynamic=False)(lambda x: x * 2)
        om = torch.compile(mod, backend="eager")
    assert torch.compile is real
    assert fn.__btx_deferred_compile__ and dec.__btx_deferred_compile__
    assert isinstance(om, torch.nn.Module) and not hasattr(om, "__btx_deferred_compile__")
    # compiled with the eager backend on first call: same numbers as the function
    x = torch.arange(4.0)
    eager = lazy_compile.deferred(real, lambda t: t * 3 + 1, {"backend": "eager"})
    assert torch.equal(eager(x), x * 3 + 1)


def test_the_tools_defer_megatron_cores_compiles_as_btx_does(tmp_path):
    """tools/*.py run the stages' command lines as `btx` does: with megatron-core's
    import-time torch.compile calls deferred (TorchDynamo and Inductor not imported: 1.3 s of
    every merge, conversion and export started from the script). Each tool does real work on a
    tiny Llama, so megatron-core is imported."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shape = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    for i in range(2):
        torch.manual_seed(i)
        LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(tmp_path / f"hf{i}")
    probe = (
        "import json, runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(json.dumps({'megatron': 'megatron.core' in sys.modules,\n"
        "                  'dynamo': 'torch._dynamo' in sys.modules}))\n"
    )
    runs = {
        "convert_dense_to_moe": ["--experts", tmp_path / "hf0", tmp_path / "hf1"],
        "convert_hf_to_megatron": ["--load", tmp_path / "hf0"],
        "convert_megatron_to_hf": ["--load", tmp_path / "convert_hf_to_megatron"],
    }
    for tool, args in runs.items():
        argv = [os.path.join(root, "tools", f"{tool}.py"), *map(str, args)]
        argv += ["--save", str(tmp_path / tool)]
        out = subprocess.run(
            [sys.executable, "-c", probe, *argv],
            env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got == {"megatron": True, "dynamo": False}, (tool, got)
