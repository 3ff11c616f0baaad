"""Fused residual-add + LayerNorm in Triton (the post-LN BERT block): y = LN(x + residual) * w + b.

Forward: one program per row computes s = x + residual, its mean and variance in fp32, writes y and
keeps only (mean, rstd) per row for the backward (s is recomputed from x and residual, so no extra
activation is stored). Backward (Ba et al. 2016, standard LayerNorm gradient):

    xhat = (s - mean) * rstd,   g = dy * w
    ds   = rstd * (g - mean(g) - xhat * mean(g * xhat))     -> grad of x and of residual
    dw   = sum_rows dy * xhat,  db = sum_rows dy

dw/db are reduced in two stages as in Liger-Kernel's layer_norm: each backward program walks a
contiguous slab of rows and writes an fp32 partial sum, and torch sums the partials.
The ``nn.Module`` is ``modules.FusedAddLayerNorm``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._utils import cdiv, check_launchable, device_context, is_interpreting, jit, next_power_of_2, tl

MAX_FUSED_SIZE = 65536  # elements per row held in registers at once (as in Liger-Kernel)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@jit
def _add_layernorm_fwd_kernel(
    X, R, W, B, Y, MEAN, RSTD,
    stride_x, stride_r, stride_y,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < n_cols
    s = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(s, axis=0) / n_cols
    centered = tl.where(ok, s - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    y = centered * rstd * w + b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@jit
def _add_layernorm_bwd_kernel(
    DY, X, R, W, MEAN, RSTD, DS, DW_PART, DB_PART,
    stride_dy, stride_x, stride_r, stride_ds,
    n_rows, n_cols, rows_per_program,
    HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < n_cols
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 offsets: N * C may pass 2^31
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row64 in range(row_start, row_end):
        s = tl.load(X + row64 * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            s += tl.load(R + row64 * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row64)
        rstd = tl.load(RSTD + row64)
        xhat = tl.where(ok, (s - mean) * rstd, 0.0)
        g = dy * w
        c1 = tl.sum(g * xhat, axis=0) / n_cols
        c2 = tl.sum(g, axis=0) / n_cols
        ds = (g - (xhat * c1 + c2)) * rstd
        tl.store(DS + row64 * stride_ds + cols, ds.to(DS.dtype.element_ty), mask=ok)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=ok)
    tl.store(DB_PART + pid * n_cols + cols, db, mask=ok)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def _settings(n_cols: int):
    block = next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"add_layernorm: hidden size {n_cols} exceeds the fused kernel's limit of "
                         f"{MAX_FUSED_SIZE} elements per row; use add_layernorm_ref / nn.LayerNorm")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., C) -> (N, C) with a contiguous last dim (a view when possible)."""
    t = t.reshape(-1, n_cols)
    return t if t.stride(-1) == 1 else t.contiguous()


def _add_layernorm_forward(x, residual, weight, bias, eps):
    n_cols = x.shape[-1]
    block, num_warps = _settings(n_cols)
    x2 = _rows(x, n_cols)
    r2 = _rows(residual, n_cols) if residual is not None else None
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    mean = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    if n_rows > 0:
        with device_context(x):
            _add_layernorm_fwd_kernel[(n_rows,)](
                x2, r2 if r2 is not None else x2, weight, bias, y, mean, rstd,
                x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0),
                n_cols, eps,
                HAS_RESIDUAL=r2 is not None, BLOCK_C=block, num_warps=num_warps,
            )
    return y.view(x.shape), x2, r2, mean, rstd


def _n_programs(n_rows: int, device: torch.device) -> int:
    if is_interpreting():
        return max(1, min(n_rows, 4))  # several rows per program + a short last slab, at test sizes
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_rows, 2 * sms))


def _add_layernorm_backward(dy, x2, r2, weight, mean, rstd, x_dtype, r_dtype):
    n_rows, n_cols = x2.shape
    block, num_warps = _settings(n_cols)
    dy2 = _rows(dy, n_cols)
    # one gradient for both inputs, kept in the wider of their dtypes (an fp32 residual stream next
    # to bf16 x gets an fp32 gradient)
    ds_dtype = torch.promote_types(x_dtype, r_dtype) if r2 is not None else x_dtype
    ds = torch.empty((n_rows, n_cols), device=x2.device, dtype=ds_dtype)
    n_prog = _n_programs(n_rows, x2.device)
    rows_per_program = cdiv(n_rows, n_prog) if n_rows else 0
    dw_part = torch.zeros((n_prog, n_cols), device=x2.device, dtype=torch.float32)
    db_part = torch.zeros((n_prog, n_cols), device=x2.device, dtype=torch.float32)
    if n_rows > 0:
        with device_context(x2):
            _add_layernorm_bwd_kernel[(n_prog,)](
                dy2, x2, r2 if r2 is not None else x2, weight, mean, rstd, ds, dw_part, db_part,
                dy2.stride(0), x2.stride(0), r2.stride(0) if r2 is not None else 0, ds.stride(0),
                n_rows, n_cols, rows_per_program,
                HAS_RESIDUAL=r2 is not None, BLOCK_C=block, num_warps=num_warps,
            )
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0)
    # x and residual get the same gradient tensor; autograd copies before accumulating into either
    dr = ds.to(r_dtype) if r2 is not None else None
    return ds.to(x_dtype), dr, dw, db


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class AddLayerNormFunction(torch.autograd.Function):
    """Autograd wrapper of the kernels: LN(x + residual) * weight + bias; saves x, residual,
    weight and the per-row (mean, rstd), and recomputes x + residual in the backward."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        """y (x's shape and dtype); residual may be None. Inputs are checked by add_layernorm."""
        y, x2, r2, mean, rstd = _add_layernorm_forward(x, residual, weight, bias, eps)
        ctx.save_for_backward(x2, r2, weight, mean, rstd)
        ctx.shapes = (x.shape, residual.shape if residual is not None else None)
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        """Grads of x, residual (None if absent), weight, bias."""
        x2, r2, weight, mean, rstd = ctx.saved_tensors
        x_dtype, r_dtype, b_dtype = ctx.dtypes
        ds, dr, dw, db = _add_layernorm_backward(dy, x2, r2, weight, mean, rstd, x_dtype, r_dtype)
        x_shape, r_shape = ctx.shapes
        return (ds.view(x_shape), dr.view(r_shape) if dr is not None else None, dw, db.to(b_dtype),
                None)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def add_layernorm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                  bias: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """y = LayerNorm(x + residual) * weight + bias over the last dim, statistics in fp32.

    x (..., C); residual same shape or None (plain LayerNorm); weight, bias (C,). y has x's dtype
    (weight may be fp32 while x is bf16 / fp16, as under autocast). Grads for x, residual, weight,
    bias. eps defaults to BERT's 1e-12.
    """
    C = x.shape[-1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"add_layernorm: weight and bias must be ({C},), got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_layernorm: residual shape {tuple(residual.shape)} != x shape "
                         f"{tuple(x.shape)}")
    check_launchable("add_layernorm", x, residual, weight, bias)
    return AddLayerNormFunction.apply(x, residual, weight.contiguous(), bias.contiguous(), float(eps))


def add_layernorm_ref(x, residual, weight, bias, eps: float = 1e-12):
    """Plain-torch reference (computes in the inputs' dtype)."""
    s = x + residual if residual is not None else x
    return torch.nn.functional.layer_norm(s, (x.shape[-1],), weight, bias, eps)
