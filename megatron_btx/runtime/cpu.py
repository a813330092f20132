"""Every adjustment megatron-core needs to run on a CPU with the gloo backend.

megatron-core is written for CUDA devices and NCCL. Running the very same model, optimizer,
pipeline schedules and checkpointing on CPU (tests, CI, the small default run) needs the eight
adjustments below, each with a one-line reason. They are applied only when no GPU is used, by
:func:`apply` (called from :func:`megatron_btx.runtime.init`), and nothing else in the package
knows they exist.

Each adjustment can be switched off by name through the environment variable ``BTX_CPU_SKIP``
(comma-separated names): the test suite uses it to prove that every adjustment is needed.

Three adjustments touch megatron-core symbols directly (``rng``, ``router_gemm``, ``sp_norm``);
they are the most likely to change between versions, so a megatron-core version other than the
ones listed in :data:`CHECKED_VERSIONS` gives a warning. Each of the three also checks, before it
is applied, that its target still exists and still has the problem: one that no longer applies
(its symbol is gone, or megatron-core fixed the bug) is not applied and is reported with a
:class:`StaleAdjustmentWarning` naming the adjustment, the megatron-core version and why
(:func:`stale_adjustments`, :func:`report_stale`), never skipped silently.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

#: megatron-core versions these adjustments were written and tested against (0.19.2: Python 3.12,
#: scripts/test_newest_mcore.sh; there `router_gemm` is reported as no longer applying).
CHECKED_VERSIONS = ("0.16.0", "0.16.1", "0.19.2")

_CPU = torch.device("cpu")


class StaleAdjustmentWarning(UserWarning):
    """A CPU adjustment's target is gone or already fixed in the installed megatron-core."""


@dataclass(frozen=True)
class Adjustment:
    name: str
    reason: str
    apply: Callable[[], None]
    #: Why the adjustment no longer applies to the installed megatron-core, or None when it does
    #: (only for the adjustments that touch megatron-core symbols).
    stale: Callable[[], str | None] | None = None


def megatron_core_version() -> str:
    """The installed megatron-core's release, without the ``+<git sha>`` its package_info adds
    when it is imported from inside a git checkout."""
    from megatron.core import package_info

    return str(package_info.__version__).split("+", 1)[0]


# --------------------------------------------------------------------------------------------
# 1. torch.cuda.current_device() used as a device.
# --------------------------------------------------------------------------------------------
def _current_device() -> None:
    # A CPU run on a machine that has a GPU must not let anything take a CUDA path with the CPU
    # as "the current device" (torch.compile's triton check looks up device properties by it).
    torch.cuda.is_available = lambda: False  # type: ignore[assignment]
    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]
    torch.cuda.set_device = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.device_count = lambda: 0  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------
# 2. Literal "cuda" devices, .cuda(), .to("cuda"), and param.type() == 'torch.cuda.FloatTensor'.
# --------------------------------------------------------------------------------------------
def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


def _map_device(dev: Any) -> Any:
    return _CPU if _is_cuda_device(dev) else dev


def _wrap_device_kwarg(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapper.__btx_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


_FACTORIES = tuple(
    "empty zeros ones full tensor arange rand randn randint randperm empty_like zeros_like "
    "ones_like full_like rand_like randn_like as_tensor linspace eye empty_strided tril_indices "
    "triu_indices".split()
)
_TENSOR_FACTORIES = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")


def _tensor_to(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = (_CPU,) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        return orig(self, *args, **kwargs)

    return to


def _cuda_devices() -> None:
    # torch's device context managers (`with torch.device("meta")`, used by transformers to
    # build models) recognise factories by identity in a cached set: fill the cache with the
    # original functions before wrapping them, or those factories escape the context.
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        fn = getattr(torch, name)
        if not getattr(fn, "__btx_wrapped__", False):
            setattr(torch, name, _wrap_device_kwarg(fn))
    for name in _TENSOR_FACTORIES:
        fn = getattr(torch.Tensor, name)
        if not getattr(fn, "__btx_wrapped__", False):
            setattr(torch.Tensor, name, _wrap_device_kwarg(fn))
    torch.Tensor.to = _tensor_to(torch.Tensor.to)  # type: ignore[method-assign]
    torch.nn.Module.to = _tensor_to(torch.nn.Module.to)  # type: ignore[method-assign]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]

    orig_type = torch.Tensor.type

    @functools.wraps(orig_type)
    def type_(self, *args, **kwargs):
        # The optimizers check param.type() == 'torch.cuda.FloatTensor': report CPU tensors as such.
        out = orig_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(out, str) and out.startswith("torch."):
            return out.replace("torch.", "torch.cuda.", 1)
        return out

    torch.Tensor.type = type_  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------
# 3. CUDA streams, events and synchronize.
# --------------------------------------------------------------------------------------------
class _InertStream:
    """Stands in for torch.cuda.Stream: on CPU all work is synchronous, in one stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, event=None):
        return event if event is not None else _InertEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _InertEvent:
    """Stands in for torch.cuda.Event."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_DEFAULT_STREAM = _InertStream()


def _streams() -> None:
    torch.cuda.Stream = _InertStream  # type: ignore[assignment,misc]
    torch.cuda.Event = _InertEvent  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda *a, **k: _DEFAULT_STREAM  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *a, **k: _DEFAULT_STREAM  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.set_stream = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda *a, **k: None  # type: ignore[assignment]
    torch.Tensor.record_stream = lambda self, *a, **k: None  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------
# 4. The tensor/expert-parallel RNG tracker.
# --------------------------------------------------------------------------------------------
def _rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore[assignment]
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.set_rng_state = lambda s, *a, **k: torch.set_rng_state(s)  # type: ignore[assignment]
    # The CPU build's lazy-call machinery silently drops set_state: replace megatron's helpers.
    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    # The forked state *is* the CPU state here, so megatron's "CPU RNG state changed" warning
    # fires on every fork; it is meaningless on CPU.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


def _rng_stale() -> str | None:
    from megatron.core.tensor_parallel import random as mrandom

    gone = [n for n in ("_get_cuda_rng_state", "_set_cuda_rng_state") if not hasattr(mrandom, n)]
    if gone:
        return f"megatron.core.tensor_parallel.random has no {' or '.join(gone)} any more"
    return None


# --------------------------------------------------------------------------------------------
# 5. all_to_all_single with tensor split sizes.
# --------------------------------------------------------------------------------------------
def _all_to_all_split_sizes() -> None:
    orig = dist.all_to_all_single

    @functools.wraps(orig)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        # gloo's binding needs list[int]; the MoE dispatcher passes tensors when not on CUDA.
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return orig(output, input, output_split_sizes, input_split_sizes, **kw)

    dist.all_to_all_single = all_to_all_single


# --------------------------------------------------------------------------------------------
# 6. all_gather with unequal first dimensions.
# --------------------------------------------------------------------------------------------
def _uneven_all_gather() -> None:
    orig = dist.all_gather

    @functools.wraps(orig)
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        shapes = [t.shape for t in tensor_list]
        if all(s == tensor.shape for s in shapes) or async_op:
            return orig(tensor_list, tensor, group=group, async_op=async_op)
        # NCCL gathers tensors of different first dimension; gloo needs equal ones: pad to the
        # largest, gather, and copy each rank's real rows back.
        rows = max(max(s[0] for s in shapes), tensor.shape[0])
        padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]].copy_(tensor)
        bufs = [padded.new_empty(padded.shape) for _ in tensor_list]
        orig(bufs, padded, group=group)
        for out, buf in zip(tensor_list, bufs):
            out.copy_(buf[: out.shape[0]])
        return None

    dist.all_gather = all_gather


# --------------------------------------------------------------------------------------------
# 7. megatron-core 0.16 refers to te_general_gemm in the router without Transformer Engine.
# --------------------------------------------------------------------------------------------
def _router_gemm() -> None:
    # Not CPU-specific (a GPU without TE needs it too): runtime/compat.py holds the fix, which
    # runtime.init applies on every device. Listed here because no CPU run works without it.
    from megatron_btx.runtime import compat

    compat.router_gemm_without_te()


def _router_gemm_stale() -> str | None:
    from megatron_btx.runtime import compat

    return compat.router_gemm_stale()


# --------------------------------------------------------------------------------------------
# 8. Sequence parallel with the torch-native norm.
# --------------------------------------------------------------------------------------------
def _sp_norm() -> None:
    import copy

    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    if getattr(cls, "__btx_sp__", False):
        return
    orig_new = cls.__new__

    def __new__(klass, config, hidden_size, eps=1e-5, *args, **kwargs):
        # WrappedTorchNorm refuses sequence parallel, which megatron-core requires for MoE with
        # TP. Build it with SP off and mark its parameters sequence_parallel, as the fused norms
        # do, so DDP still all-reduces their gradients over the TP group.
        if not config.sequence_parallel:
            return orig_new(klass, config, hidden_size, eps, *args, **kwargs)
        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        norm = orig_new(klass, cfg, hidden_size, eps, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    cls.__new__ = staticmethod(__new__)
    cls.__btx_sp__ = True


def _sp_norm_stale() -> str | None:
    from megatron.core.transformer import torch_norm

    cls = getattr(torch_norm, "WrappedTorchNorm", None)
    if cls is None:
        return "megatron.core.transformer.torch_norm has no WrappedTorchNorm any more"
    if getattr(cls, "__btx_sp__", False):
        return None  # adjusted already in this process
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return None  # no source to inspect: assume the refusal is still there
    if "not config.sequence_parallel" not in source:
        return "WrappedTorchNorm no longer refuses sequence parallel (fixed upstream)"
    return None


ADJUSTMENTS: tuple[Adjustment, ...] = (
    Adjustment(
        "current_device",
        "torch.cuda.current_device() is used as a device in ~175 places",
        _current_device,
    ),
    Adjustment(
        "cuda_devices", "literal 'cuda' devices, .cuda() and cuda tensor-type checks", _cuda_devices
    ),
    Adjustment(
        "streams",
        "DDP, the MoE dispatcher, p2p and checkpointing use CUDA streams/events",
        _streams,
    ),
    Adjustment(
        "rng",
        "the TP/EP RNG tracker forks 'the CUDA generator' (megatron-core symbol)",
        _rng,
        _rng_stale,
    ),
    Adjustment(
        "all_to_all_split_sizes",
        "gloo's all_to_all_single needs list split sizes",
        _all_to_all_split_sizes,
    ),
    Adjustment(
        "uneven_all_gather",
        "gloo's all_gather needs equal shapes; NCCL does not",
        _uneven_all_gather,
    ),
    Adjustment(
        "router_gemm",
        "megatron-core 0.16 names te_general_gemm without TE (NameError)",
        _router_gemm,
        _router_gemm_stale,
    ),
    Adjustment(
        "sp_norm",
        "WrappedTorchNorm asserts not sequence_parallel (megatron-core symbol)",
        _sp_norm,
        _sp_norm_stale,
    ),
)

_applied: list[str] = []


def skipped() -> set[str]:
    """Adjustments switched off through BTX_CPU_SKIP (for the tests that prove each is needed)."""
    names = {n.strip() for n in os.environ.get("BTX_CPU_SKIP", "").split(",") if n.strip()}
    unknown = names - {a.name for a in ADJUSTMENTS}
    if unknown:
        raise ValueError(f"BTX_CPU_SKIP names unknown adjustments: {sorted(unknown)}")
    return names


def stale_adjustments() -> dict[str, str]:
    """{adjustment name: why it no longer applies} for the installed megatron-core."""
    out = {}
    for adj in ADJUSTMENTS:
        why = adj.stale() if adj.stale is not None else None
        if why:
            out[adj.name] = why
    return out


def report_stale() -> dict[str, str]:
    """Warn once per adjustment that no longer applies, naming it and the megatron-core version;
    return them (apply() skips these)."""
    stale = stale_adjustments()
    version = megatron_core_version()
    for name, why in stale.items():
        warnings.warn(
            f"CPU adjustment {name!r} no longer applies on megatron-core {version}: {why}; "
            "it was not applied (megatron_btx/runtime/cpu.py can drop it for this version)",
            StaleAdjustmentWarning,
            stacklevel=2,
        )
    return stale


def apply() -> list[str]:
    """Apply every CPU adjustment once (idempotent). Returns the names applied."""
    if _applied:
        return list(_applied)
    version = megatron_core_version()
    if version not in CHECKED_VERSIONS:
        warnings.warn(
            f"megatron-core {version} was not checked with megatron_btx's CPU "
            f"adjustments (checked: {', '.join(CHECKED_VERSIONS)}); CPU runs may fail.",
            stacklevel=2,
        )
    skip = skipped()
    stale = report_stale()
    for adj in ADJUSTMENTS:
        if adj.name in skip:
            log.warning("CPU adjustment %s skipped (BTX_CPU_SKIP)", adj.name)
            continue
        if adj.name in stale:
            continue
        adj.apply()
        _applied.append(adj.name)
    log.info("CPU mode: applied %d megatron-core adjustments", len(_applied))
    return list(_applied)


def applied() -> list[str]:
    return list(_applied)


def wrapped_factories() -> list[Callable]:
    """The original torch factories behind this module's device-mapping wrappers.

    `with torch.device("meta")` intercepts only the factory functions it knew when first used;
    a wrapper calls the original, which the device context must also know to build on `meta`."""
    found = []
    for name in dir(torch):
        fn = getattr(torch, name, None)
        original = getattr(fn, "__wrapped__", None)
        if original is not None and getattr(fn, "__btx_wrapped__", False):
            found.append(original)
    return found
