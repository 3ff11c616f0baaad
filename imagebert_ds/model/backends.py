"""Where the model meets the optional Triton kernels: one place that says whether they can run.

The model builds the kernels' Modules (``imagebert_ds.kernels.modules``) where its config asks
for them. A configured fast path that cannot run is an error, never a silent switch to another
backend (HF's attention-backend table habit): ``require_triton`` is called before such a Module
is built and raises naming the config key; ``check_launchable`` is called on the first tensor a
kernel would see and raises when the kernels cannot run on its device.
"""
from __future__ import annotations

import torch

from imagebert_ds.kernels import is_interpreting, why_unavailable


def kernels_launchable(t: torch.Tensor) -> bool:
    """Triton kernels launch on ``t``: CUDA tensors with triton + CUDA, or CPU tensors under
    ``TRITON_INTERPRET=1``."""
    if why_unavailable() is not None:
        return False
    return t.device.type == ("cpu" if is_interpreting() else "cuda")


def require_triton(key: str) -> None:
    """Raise ``ValueError`` naming config key ``key`` when Triton cannot run in this process."""
    reason = why_unavailable()
    if reason is not None:
        raise ValueError(f"{key} needs the Triton kernels, which cannot run here: {reason}")


def check_launchable(t: torch.Tensor, key: str) -> None:
    """Raise ``RuntimeError`` when the kernels enabled by config key ``key`` cannot run on
    ``t``'s device (e.g. a CUDA-configured model evaluated on CPU tensors)."""
    if not kernels_launchable(t):
        where = "CPU tensors only under TRITON_INTERPRET=1" if not is_interpreting() \
            else "CPU tensors only (TRITON_INTERPRET=1 is set)"
        raise RuntimeError(f"{key}: the Triton kernels cannot run on {t.device} tensors here "
                           f"({where}); move the model or choose another backend")
