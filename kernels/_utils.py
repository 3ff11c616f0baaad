"""Shared plumbing for the Triton ops in this package: optional-import probe, lazy jit, launch checks.

Triton is optional (``pip install imagebert_ds[triton]``). When it is missing the op modules still
import -- their ``*_ref`` torch references work everywhere -- and a kernel call raises an error that
says what is missing.

``@triton.jit`` decides at *decoration* time whether to build a GPU kernel or an interpreted one
(``TRITON_INTERPRET=1``). The kernels here are wrapped with :func:`jit`, which defers that decision
to the first launch, so importing this package before setting ``TRITON_INTERPRET`` (e.g. through
the model in another test module) does not lock the kernels into GPU mode.
"""
from __future__ import annotations

import os

import torch

try:  # probe once at import
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    HAS_TRITON = False

    class _MissingTriton:
        """Stands in for ``triton`` so the op files import; every launch goes through
        :func:`check_launchable`, which raises before a kernel could be built."""

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(int(n) - 1, 0).bit_length()

    class _MissingTL:
        constexpr = None

    triton = _MissingTriton()  # type: ignore[assignment]
    tl = _MissingTL()  # type: ignore[assignment]


class _LazyJIT:
    """A ``@triton.jit`` kernel built on first launch, once per mode (GPU / interpreter)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._kernels = {}

    def kernel(self):
        mode = is_interpreting()
        k = self._kernels.get(mode)
        if k is None:
            k = self._kernels[mode] = triton.jit(self.fn)
        return k

    def __getitem__(self, grid):
        return self.kernel()[grid]


def jit(fn):
    """Use instead of ``@triton.jit`` for launchable kernels (not for device helpers)."""
    return _LazyJIT(fn)


def is_interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON:
        return False
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True when the Triton kernels can run here: triton imports AND (CUDA is present OR the
    interpreter is on). The model uses this to fall back to SDPA / eager torch with a notice."""
    return HAS_TRITON and (torch.cuda.is_available() or is_interpreting())


def check_launchable(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error when ``op``'s Triton kernel cannot run on these tensors."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: the Triton kernel needs the `triton` package (pip install "
                           f"'imagebert_ds[triton]'); use {op}_ref or the torch path instead")
    interp = is_interpreting()
    for t in tensors:
        if t is None:
            continue
        if interp and t.device.type != "cpu":
            raise RuntimeError(f"{op}: TRITON_INTERPRET=1 runs kernels on CPU tensors, got a tensor "
                               f"on {t.device}")
        if not interp and t.device.type != "cuda":
            raise RuntimeError(f"{op}: the Triton kernel needs CUDA tensors (got {t.device}); set "
                               f"TRITON_INTERPRET=1 before importing to run it on the CPU, or use "
                               f"{op}_ref")


def upcast_dot(dtype: torch.dtype) -> bool:
    """The Triton 3.x interpreter multiplies bfloat16 tiles as their raw uint16 bits, so under the
    interpreter bf16 tiles are upcast to fp32 before ``tl.dot``. bf16 x bf16 products are exact in
    fp32, so this matches the GPU's bf16 MMA with fp32 accumulation up to summation order."""
    return is_interpreting() and dtype == torch.bfloat16


def device_context(t: torch.Tensor):
    """Launch on the tensor's own GPU (multi-GPU processes may have another current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()
