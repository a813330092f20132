"""Distributed start-up and tear-down: torch.distributed + megatron-core parallel_state.

One function for every way we run: under torchrun on GPUs (NCCL), under torchrun on CPUs (gloo),
or as a single process with no launcher at all (tools, tests, notebooks).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_btx.errors import BTXError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp: int
    pp: int
    ep: int
    etp: int
    dp: int

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


_RUNTIME: Runtime | None = None


def use_gpu(requested: str = "auto") -> bool:
    """`auto` uses a GPU when torch sees one; `cpu` forces CPU; `cuda` insists on a GPU."""
    if requested == "cpu":
        return False
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise BTXError("device 'cuda' was requested but torch sees no GPU; use --device cpu")
        return True
    return torch.cuda.is_available()


#: On a CPU with bf16 matrix units, the narrowest model (hidden size) that trains faster in bf16
#: (with fp32 master weights) than in fp32; narrower ones stay fp32, where bf16's casts cost more
#: than its matrix products save (benchmarks/bench_real_seed_cpu.py, BENCHMARKS.md).
CPU_BF16_MIN_HIDDEN = 512


def cpu_has_bf16_matmul() -> bool:
    """The CPU multiplies bf16 matrices in hardware (Intel AMX tiles, or AVX-512 BF16)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def auto_dtype(on_gpu: bool, hidden_size: int) -> str:
    """`train.dtype: auto`: bf16 on a GPU; on a CPU, bf16 where it was measured faster (bf16
    matrix units and a model at least :data:`CPU_BF16_MIN_HIDDEN` wide), fp32 otherwise."""
    if on_gpu:
        return "bf16"
    return "bf16" if cpu_has_bf16_matmul() and hidden_size >= CPU_BF16_MIN_HIDDEN else "fp32"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    device: str = "auto",
    seed: int = 1234,
    timeout_s: int = 1800,
) -> Runtime:
    """Start torch.distributed from torchrun's environment (or as one process) and set up
    megatron-core's parallel_state with TP, PP, EP and expert-TP sizes; seed the RNG tracker."""
    global _RUNTIME
    if _RUNTIME is not None:
        raise RuntimeError("megatron_btx.runtime.init called twice without teardown()")
    gpu = use_gpu(device)
    if not gpu:
        from megatron_btx.runtime import cpu

        cpu.apply()
    else:
        from megatron_btx.runtime import compat

        compat.apply()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    etp = tp if etp is None else etp
    if world % (tp * pp) != 0:
        raise BTXError(
            f"world size {world} is not divisible by tensor x pipeline parallel {tp}x{pp}; "
            f"launch a multiple of {tp * pp} processes"
        )
    if world % (etp * ep * pp) != 0:
        raise BTXError(
            f"world size {world} is not divisible by expert-TP x EP x PP = {etp}x{ep}x{pp}"
        )
    backend = "nccl" if gpu else "gloo"
    if gpu:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        # Without torchrun, a private rendezvous: os.environ is left alone so that child
        # processes (torchrun jobs started by this one) do not inherit a stale port.
        init_method = None if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            world_size=world,
            rank=rank,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    _RUNTIME = Runtime(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        device=dev,
        backend=backend,
        tp=tp,
        pp=pp,
        ep=ep,
        etp=etp,
        dp=world // (tp * pp),
    )
    if rank == 0:
        log.info(
            "runtime: %d process(es), backend %s, TP=%d PP=%d EP=%d ETP=%d DP=%d",
            world,
            backend,
            tp,
            pp,
            ep,
            etp,
            _RUNTIME.dp,
        )
    return _RUNTIME


def get() -> Runtime:
    if _RUNTIME is None:
        raise RuntimeError("megatron_btx.runtime.init() has not been called")
    return _RUNTIME


def teardown() -> None:
    """Destroy megatron-core's groups and the process group, so a process can init again."""
    global _RUNTIME
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _RUNTIME = None


def on_gpu() -> bool:
    """Whether this process computes on a GPU: the runtime's device once :func:`init` ran, else
    whether torch sees one (so a CPU run on a GPU machine never picks GPU-only kernels)."""
    if _RUNTIME is not None:
        return _RUNTIME.on_gpu
    return torch.cuda.is_available()


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build modules on the `meta` device (shapes, no storage), also inside a CPU runtime, whose
    device-mapping wrappers of torch's factories the plain `torch.device("meta")` would miss."""
    import torch.utils._device as torch_device

    from megatron_btx.runtime import cpu

    known = torch_device._device_constructors()
    known.update(cpu.wrapped_factories())
    with torch.device("meta"):
        yield


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A temporary 1-rank gloo process group when none exists, removed again afterwards.

    Some megatron-core helpers call ``torch.distributed.get_rank()`` without checking that a group
    exists (0.16.1's BlendedDataset when it writes its cache); under torchrun, or inside
    :func:`init`, the caller's group is used as is."""
    if not dist.is_available() or dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="btx_pg_") as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


class single_process:
    """A one-process CPU runtime for tools (converters, merge, evaluation), unless the caller
    already set one up: `with runtime.single_process(): ...`."""

    def __enter__(self) -> "single_process":
        self.owned = _RUNTIME is None
        if self.owned:
            init(device="cpu")
        return self

    def __exit__(self, *exc) -> bool:
        if self.owned:
            teardown()
        return False


@contextlib.contextmanager
def threads_beside(busy: Callable[[], bool]) -> Iterator[None]:
    """torch's intra-op threads limited to the cores that work on another thread leaves free,
    while ``busy()`` says it runs (checked on entry). On 2 cores, torch's second thread
    spin-waited between the merge's many small ops on the core the sources' hashing needed:
    3 s of CPU and 1.5 s of a 10 s merge."""
    old = torch.get_num_threads()
    if not busy():
        yield
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, min(old, (cores or 1) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(old)
