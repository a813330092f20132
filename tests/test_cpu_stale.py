"""A CPU adjustment whose megatron-core target is gone or already fixed is reported (a warning
naming the adjustment and the megatron-core version) and not applied, never skipped silently.

The megatron-core symbols are replaced with monkeypatch (restored after each test); nothing here
applies the adjustments, so torch is left untouched in the pytest process."""

from __future__ import annotations

import pytest
import torch
from megatron.core import package_info
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer import torch_norm
from megatron.core.transformer.moe import moe_utils

from megatron_btx.runtime import compat, cpu


def _version() -> str:
    return package_info.__version__.split("+")[0]


def _fresh_router_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give moe_utils the state of a fresh import of the installed megatron-core."""
    if getattr(moe_utils, compat._MARK, False):  # our fix ran earlier in this process
        monkeypatch.delattr(moe_utils, compat._MARK)
        monkeypatch.delattr(moe_utils, "te_general_gemm")


#: What a fresh import of each megatron-core version the suite ran on reports (0.17 moved
#: te_general_gemm = None into megatron-core itself).
KNOWN_STALE = {"0.16.0": set(), "0.16.1": set(), "0.19.2": {"router_gemm"}}


def test_installed_version_reports_what_is_known(monkeypatch):
    """On the versions the suite ran on, exactly the known adjustments are stale."""
    _fresh_router_state(monkeypatch)
    if _version() not in KNOWN_STALE:
        pytest.skip(f"megatron-core {_version()} was not run by the suite")
    assert set(cpu.stale_adjustments()) == KNOWN_STALE[_version()]
    assert set(KNOWN_STALE) == set(cpu.CHECKED_VERSIONS)


def test_gone_rng_helper_is_reported(monkeypatch):
    _fresh_router_state(monkeypatch)
    monkeypatch.delattr(mrandom, "_set_cuda_rng_state")
    stale = cpu.stale_adjustments()
    assert "_set_cuda_rng_state" in stale["rng"]
    with pytest.warns(cpu.StaleAdjustmentWarning, match=rf"'rng'.*megatron-core {_version()}"):
        assert "rng" in cpu.report_stale()


def test_router_gemm_fixed_upstream_is_reported_but_our_own_fix_is_not(monkeypatch):
    _fresh_router_state(monkeypatch)
    upstream_defines_it = hasattr(moe_utils, "te_general_gemm")  # megatron-core >= 0.17
    if not upstream_defines_it:
        assert "router_gemm" not in cpu.stale_adjustments()
        # our fix defines it and marks it: still not stale in this process
        assert compat.router_gemm_without_te() is True
        assert "router_gemm" not in cpu.stale_adjustments()
        monkeypatch.delattr(moe_utils, compat._MARK)  # now as if megatron-core defined it
    with pytest.warns(cpu.StaleAdjustmentWarning, match=r"'router_gemm'.*fixed upstream"):
        assert "router_gemm" in cpu.report_stale()


def test_sp_norm_fixed_or_gone_is_reported(monkeypatch):
    _fresh_router_state(monkeypatch)

    class WrappedTorchNorm:  # a megatron-core whose torch norm accepts sequence parallel
        def __new__(cls, config, hidden_size, eps=1e-5):
            return torch.nn.LayerNorm(hidden_size, eps=eps)

    monkeypatch.setattr(torch_norm, "WrappedTorchNorm", WrappedTorchNorm)
    assert cpu.stale_adjustments()["sp_norm"].startswith("WrappedTorchNorm no longer refuses")
    monkeypatch.delattr(torch_norm, "WrappedTorchNorm")
    with pytest.warns(cpu.StaleAdjustmentWarning, match=r"'sp_norm'.*no WrappedTorchNorm"):
        assert "sp_norm" in cpu.report_stale()


def test_version_without_git_suffix(monkeypatch):
    """package_info appends '+<sha>' when imported from inside a git checkout (a venv in the
    repository): the checked-version comparison must not see it."""
    monkeypatch.setattr(package_info, "__version__", "0.16.1+4af5342")
    assert cpu.megatron_core_version() == "0.16.1"
