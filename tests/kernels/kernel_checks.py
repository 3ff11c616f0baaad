"""Shared pieces of the kernel tests: device, skip marks, reference dtypes and the error check.

``TRITON_INTERPRET=1`` (no CUDA) is set once in tests/conftest.py, before anything imports triton.
"""
import pytest
import torch

from imagebert_ds.kernels import triton_available, why_unavailable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(not triton_available(),
                                     reason=f"Triton kernels unavailable: {why_unavailable()}")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="full-size check needs a CUDA GPU")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# References run in float64, except for bf16 inputs (float32, as the kernels accumulate).
REF_DTYPE = {torch.float32: torch.float64, torch.float16: torch.float64, torch.bfloat16: torch.float32}


def assert_rel_close(actual, ref, tol: float, what: str, floor: float) -> None:
    """Max |actual - ref| <= tol * max(max |ref|, floor); ``floor`` keeps an all-zero reference
    (e.g. dq at L = 1) from demanding an exact zero."""
    actual = actual.to(ref.dtype)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, floor)
    assert err <= tol * scale, f"{what}: max err {err:.3g} > {tol} * {scale:.3g}"
