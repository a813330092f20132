"""megatron-core's `torch.compile` decorators, compiled at first call instead of at import.

megatron-core decorates its fused kernels (bias-GeLU, bias-SwiGLU, ...) with `jit_fuser`, which is
`torch.compile`, while `megatron.core` is imported. Decorating a function imports TorchDynamo and
Inductor: measured on the 2-core CI machine, `import megatron.core` takes 2.1 s of CPU, 1.2 s of
it for those imports, in every process (the merge, the converters, each test's worker) whether or
not it ever calls a fused kernel. :func:`install` registers an import hook that runs megatron-core's
package import with `torch.compile` replaced by :func:`deferred`: a plain function's compilation
is done by the real `torch.compile`, with the same arguments, on its first call, which is when
`torch.compile` would have compiled it anyway. Modules and anything else go to the real
`torch.compile` at once. `torch.compile` itself is restored when the import ends.

The same hook pauses the cyclic garbage collector during that import (its full passes over the
~200k objects the import creates cost another 0.5 s) and then moves those objects, which live as
long as the process, to the collector's permanent generation (`gc.freeze`), so that later full
collections do not walk them again.

Every `btx` command (:func:`megatron_btx.cli.main`, ``python -m megatron_btx.training``)
installs it first; importing megatron_btx does not (a library user may call :func:`install`).
Set BTX_LAZY_COMPILE=0 to import megatron-core untouched.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.abc
import inspect
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

_TARGET = "megatron.core"


def deferred(real: Callable[..., Any], fn: Callable[..., Any], kwargs: dict[str, Any]):
    """`fn` compiled by `real(fn, **kwargs)` on its first call; later calls use that result."""
    compiled: Callable[..., Any] | None = None
    lock = threading.Lock()

    @functools.wraps(fn)
    def call(*args, **kw):
        nonlocal compiled
        if compiled is None:
            with lock:
                if compiled is None:
                    compiled = real(fn, **kwargs)
        return compiled(*args, **kw)

    call.__btx_deferred_compile__ = True
    return call


@contextlib.contextmanager
def deferring_compile() -> Iterator[None]:
    """Within: `torch.compile(function, ...)` (direct or as `@torch.compile(...)`) is deferred."""
    import torch

    real = torch.compile

    def compile(model=None, **kwargs):
        if model is None:  # @torch.compile(mode=...) form
            return lambda f: compile(f, **kwargs)
        if inspect.isfunction(model):
            return deferred(real, model, kwargs)
        return real(model, **kwargs)

    torch.compile = compile
    try:
        yield
    finally:
        torch.compile = real


class _Loader(importlib.abc.Loader):
    """The package's own loader, its module body run inside :func:`deferring_compile`."""

    def __init__(self, inner: importlib.abc.Loader):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        was = gc.isenabled()
        gc.disable()
        try:
            with deferring_compile():
                self._inner.exec_module(module)
        finally:
            if was:
                gc.enable()
                gc.freeze()

    def __getattr__(self, name: str):  # get_resource_reader, is_package, ...
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register the import hook (once; a no-op when megatron-core is already imported or
    BTX_LAZY_COMPILE=0)."""
    if os.environ.get("BTX_LAZY_COMPILE", "1") == "0" or _TARGET in sys.modules:
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
