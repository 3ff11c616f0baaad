"""Shared plumbing for the Triton ops: optional-import probe, lazy jit, launch checks.

Triton is optional (``pip install imagebert_ds[triton]``); without it the ``*_ref`` references
work and a kernel call raises naming what is missing. Triton is imported at the first launch, not
at import, so ``TRITON_INTERPRET=1`` set later still takes effect (docs/kernels.md, "Availability").
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None  # installed; imported only when needed

_TRUTHY = ("1", "true", "yes", "on", "y")


class _LazyModule(types.ModuleType):
    """Imports the named module on first attribute access. :func:`jit` swaps these for the real
    modules in a kernel's globals before building it (the Triton frontends want real modules)."""

    def __init__(self, name: str):
        super().__init__(name)

    def _load(self):
        return importlib.import_module(self.__name__)

    def __getattr__(self, attr):
        return getattr(self._load(), attr)


triton = _LazyModule("triton")
tl = _LazyModule("triton.language")


def cdiv(a: int, b: int) -> int:
    """Ceiling division for python ints (``triton.cdiv`` without importing triton)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1), like ``triton.next_power_of_2``."""
    return 1 << max(int(n) - 1, 0).bit_length()


def is_interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUTHY


def _interpreter_broken() -> bool:
    """True when triton was imported before TRITON_INTERPRET was set: its builtins were then
    compiled as GPU functions and the interpreter cannot run any kernel in this process."""
    if "triton.language" not in sys.modules:
        return False
    from triton.runtime.jit import JITFunction

    return isinstance(sys.modules["triton.language"].zeros, JITFunction)


def why_unavailable() -> str | None:
    """None when the Triton kernels can run here, else the reason (for logs and skip messages)."""
    if not HAS_TRITON:
        return "the `triton` package is not installed (pip install 'imagebert_ds[triton]')"
    if not torch.cuda.is_available() and not is_interpreting():
        return "no CUDA device, and TRITON_INTERPRET=1 is not set"
    try:
        importlib.import_module("triton.language")
    except Exception as e:  # a broken install must not break the fallback path
        return f"`import triton` failed: {e!r}"
    if not torch.cuda.is_available() and _interpreter_broken():
        return ("TRITON_INTERPRET=1 was set after triton had been imported in this process; set it "
                "before anything imports triton (e.g. at the top of tests/conftest.py)")
    return None


def triton_available() -> bool:
    """True when the Triton kernels can run here: triton imports AND (CUDA is present OR the
    interpreter is on). The model uses this to fall back to SDPA / eager torch with a notice
    (log :func:`why_unavailable` for the reason)."""
    return why_unavailable() is None


class _LazyJIT:
    """A ``@triton.jit`` function built on first use, once per mode (GPU / interpreter).

    Either a launchable kernel (``kernel[grid](...)``) or a device helper that other kernels call.
    Each build jits a copy of the function whose globals are a snapshot of its module's, with the
    stand-ins resolved: ``triton`` / ``tl`` become the real modules (the Triton frontends want
    real modules) and every :func:`jit` helper becomes its built function for the same mode, which
    is what lets one jitted function call another. The module's own globals are never changed.
    """

    def __init__(self, fn, options: dict):
        self.fn = fn
        self.options = options
        self.__name__ = fn.__name__
        self.__qualname__ = fn.__qualname__
        self.__doc__ = fn.__doc__
        self._kernels = {}

    def kernel(self):
        """The real ``triton.jit`` function (a JITFunction, or an InterpretedFunction under
        ``TRITON_INTERPRET=1``), built on first call for the current mode."""
        mode = is_interpreting()
        k = self._kernels.get(mode)
        if k is None:
            real_triton = importlib.import_module("triton")
            importlib.import_module("triton.language")
            k = self._kernels[mode] = real_triton.jit(_resolved_copy(self.fn), **self.options)
        return k

    def __getitem__(self, grid):
        return self.kernel()[grid]

    def __call__(self, *args, **kwargs):
        raise TypeError(f"{self.__name__} is a Triton function: launch it as {self.__name__}[grid](...) "
                        f"or call it from another @jit function")


def _resolved_copy(fn):
    """``fn`` with its own globals dict in which lazy modules and :func:`jit` helpers are real."""
    g = dict(fn.__globals__)
    for name, value in g.items():
        if isinstance(value, _LazyModule):
            g[name] = value._load()
        elif isinstance(value, _LazyJIT) and name in fn.__code__.co_names:
            g[name] = value.kernel()  # a device helper this function calls (built recursively)
    copy = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__annotations__ = dict(fn.__annotations__)
    return copy


def jit(fn=None, **options):
    """Use instead of ``@triton.jit``, for launchable kernels and device helpers alike (a helper
    called from a kernel is built with it, for the same mode). ``options`` go to ``triton.jit``
    (e.g. ``do_not_specialize=("seed",)``)."""
    if fn is None:
        return lambda f: _LazyJIT(f, options)
    return _LazyJIT(fn, options)


def is_out_of_resources(err: Exception) -> bool:
    """Triton's OutOfResources (shared memory / registers), matched without importing triton."""
    return type(err).__name__ == "OutOfResources"


def check_launchable(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error when ``op``'s Triton kernel cannot run on these tensors."""
    interp = is_interpreting()
    for t in tensors:
        if t is None:
            continue
        if interp and t.device.type != "cpu":
            raise RuntimeError(f"{op}: TRITON_INTERPRET=1 runs kernels on CPU tensors, got a tensor "
                               f"on {t.device}")
        if not interp and t.device.type != "cuda":
            raise RuntimeError(f"{op}: the Triton kernel needs CUDA tensors (got {t.device}); set "
                               f"TRITON_INTERPRET=1 before importing triton to run it on the CPU, "
                               f"or use {op}_ref")
    reason = why_unavailable()
    if reason is not None:
        raise RuntimeError(f"{op}: Triton kernel unavailable: {reason}; use {op}_ref or the torch path")


def upcast_dot(dtype: torch.dtype) -> bool:
    """The Triton 3.x interpreter multiplies bfloat16 tiles as their raw uint16 bits, so under the
    interpreter bf16 tiles are upcast to fp32 before ``tl.dot``. bf16 x bf16 products are exact in
    fp32, so this matches the GPU's bf16 MMA with fp32 accumulation up to summation order."""
    return is_interpreting() and dtype == torch.bfloat16


def device_context(t: torch.Tensor):
    """Launch on the tensor's own GPU (multi-GPU processes may have another current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
