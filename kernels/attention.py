"""Flash attention in Triton: non-causal, forward and backward, padded and packed (varlen) layouts.

Follows FlashAttention-2 (Dao, 2023, arXiv:2307.08691, Alg. 1 forward / Alg. 2 backward): queries
are processed in blocks of BLOCK_M rows, keys/values streamed in blocks of BLOCK_N with an online
softmax, so the (L x L) score matrix is never materialized. The forward saves only the output and
the per-row log-sum-exp; the backward recomputes the probabilities block by block. The backward is
split into a dK/dV kernel (one program per key block, looping over query blocks) and a dQ kernel
(one program per query block, looping over key blocks) so that no atomics are needed and the
result is deterministic.

Layouts (D = head dim in {16, 32, 64, 128}, last dim must be contiguous, other strides are free so
views such as ``qkv.view(B, L, 3, H, D)[:, :, 0].transpose(1, 2)`` need no copy):
  * padded: q, k, v (B, H, L, D) with an optional ``key_padding_mask`` (B, L) bool,
    **True = keep (a real token)**, False = padding (the key is ignored). Query rows at padding
    positions are still computed (attending to the real keys); the caller ignores them.
  * varlen: q, k, v (total_tokens, H, D) packed sequence after sequence, with ``cu_seqlens``
    (B + 1,) int32 cumulative lengths (cu_seqlens[0] = 0, cu_seqlens[-1] = total_tokens) and
    ``max_seqlen`` = max(lengths) as a python int, as in flash-attn's ``flash_attn_varlen_func``.
A row whose keys are all masked (or a zero-length sequence) yields zeros and zero gradients.

All matmuls accumulate in fp32; the softmax runs in fp32 in the log2 domain (exp2).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._utils import (
    cdiv,
    check_launchable,
    device_context,
    is_interpreting,
    is_out_of_resources,
    jit,
    tl,
    upcast_dot,
)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KMASK, KV_END, CU_SEQLENS,
    qk_scale,  # softmax_scale * log2(e)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_mb,
    n_heads, seqlen_padded,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_KMASK: tl.constexpr, UPCAST: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    if VARLEN:
        seq_start = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - seq_start
    else:
        seq_start = 0
        seqlen = seqlen_padded
    if start_m * BLOCK_M >= seqlen:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    kv_hi = seqlen
    if HAS_KMASK:  # keys after the last real one are skipped (right padding costs nothing)
        kv_hi = tl.minimum(seqlen, tl.load(KV_END + b))

    q_ptrs = Q + b * stride_qb + h * stride_qh + (seq_start + offs_m)[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh + seq_start * stride_kn
    v_base = V + b * stride_vb + h * stride_vh + seq_start * stride_vn

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, kv_hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen
        if HAS_KMASK:
            keep = tl.load(KMASK + b * stride_mb + cols, mask=col_ok, other=0)
            col_ok = col_ok & (keep != 0)
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :],
                    mask=(cols < seqlen)[:, None], other=0.0)  # (BLOCK_N, D)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no valid key so far has m_new = -inf; shift by 0 instead so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=(cols < seqlen)[:, None], other=0.0)  # (BLOCK_N, D)
        p = p.to(V.dtype.element_ty)
        if UPCAST:
            v = v.to(tl.float32)
            p = p.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision="ieee")
        m_i = m_new

    empty = l_i == 0.0  # every key masked: output 0, lse = +inf so the backward's exp2 gives 0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    o_ptrs = O + b * stride_ob + h * stride_oh + (seq_start + offs_m)[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b * stride_lb + h * stride_lh + seq_start + offs_m, lse, mask=row_ok)


@jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, CU_SEQLENS,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    n_heads, seqlen_padded,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id in fp32 (FA2 Alg. 2 line 4), laid out like the lse."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    if VARLEN:
        seq_start = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - seq_start
    else:
        seq_start = 0
        seqlen = seqlen_padded
    if start_m * BLOCK_M >= seqlen:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    rows = seq_start + offs_m
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + b * stride_lb + h * stride_lh + rows, tl.sum(o * do, axis=1), mask=row_ok)


@jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KMASK, KV_END, CU_SEQLENS,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh,
    stride_mb,
    n_heads, seqlen_padded,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_KMASK: tl.constexpr, UPCAST: tl.constexpr,
):
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    if VARLEN:
        seq_start = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - seq_start
    else:
        seq_start = 0
        seqlen = seqlen_padded
    if start_n * BLOCK_N >= seqlen:
        return

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_in = offs_n < seqlen
    col_ok = col_in
    m_hi = seqlen
    if HAS_KMASK:
        keep = tl.load(KMASK + b * stride_mb + offs_n, mask=col_in, other=0)
        col_ok = col_ok & (keep != 0)
        # a key block past the last real key has dK = dV = 0: skip the loop, still store the zeros
        m_hi = tl.where(start_n * BLOCK_N < tl.load(KV_END + b), seqlen, 0)

    k = tl.load(K + b * stride_kb + h * stride_kh + (seq_start + offs_n)[:, None] * stride_kn + offs_d[None, :],
                mask=col_in[:, None], other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + b * stride_vb + h * stride_vh + (seq_start + offs_n)[:, None] * stride_vn + offs_d[None, :],
                mask=col_in[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh + seq_start * stride_qm
    do_base = DO + b * stride_dob + h * stride_doh + seq_start * stride_dom
    l_base = LSE + b * stride_lb + h * stride_lh + seq_start
    d_base = DELTA + b * stride_lb + h * stride_lh + seq_start

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, m_hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        # out-of-range rows get lse = +inf so their probabilities are exactly 0
        lse = tl.load(l_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(d_base + rows, mask=row_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        sT = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(sT - lse[None, :])
        pT = tl.where(col_ok[:, None] & row_ok[None, :], pT, 0.0)
        pT_lo = pT.to(DO.dtype.element_ty)
        if UPCAST:
            pT_lo = pT_lo.to(tl.float32)
        dv = tl.dot(pT_lo, do, dv, input_precision="ieee")
        dpT = tl.dot(v, tl.trans(do), input_precision="ieee")  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dsT_lo = dsT.to(Q.dtype.element_ty)
        if UPCAST:
            dsT_lo = dsT_lo.to(tl.float32)
        dk = tl.dot(dsT_lo, q, dk, input_precision="ieee")
    dk = dk * sm_scale

    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + (seq_start + offs_n)[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + (seq_start + offs_n)[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_in[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_in[:, None])


@jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KMASK, KV_END, CU_SEQLENS,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh,
    stride_mb,
    n_heads, seqlen_padded,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_KMASK: tl.constexpr, UPCAST: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    if VARLEN:
        seq_start = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - seq_start
    else:
        seq_start = 0
        seqlen = seqlen_padded
    if start_m * BLOCK_M >= seqlen:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen

    q = tl.load(Q + b * stride_qb + h * stride_qh + (seq_start + offs_m)[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + (seq_start + offs_m)[:, None] * stride_dom + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + seq_start + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + b * stride_lb + h * stride_lh + seq_start + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh + seq_start * stride_kn
    v_base = V + b * stride_vb + h * stride_vh + seq_start * stride_vn
    kv_hi = seqlen
    if HAS_KMASK:
        kv_hi = tl.minimum(seqlen, tl.load(KV_END + b))

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, kv_hi, BLOCK_N):
        cols = start_n + offs_n
        col_in = cols < seqlen
        col_ok = col_in
        if HAS_KMASK:
            keep = tl.load(KMASK + b * stride_mb + cols, mask=col_in, other=0)
            col_ok = col_ok & (keep != 0)
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=col_in[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=col_in[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        ds_lo = ds.to(K.dtype.element_ty)
        if UPCAST:
            ds_lo = ds_lo.to(tl.float32)
        dq = tl.dot(ds_lo, k, dq, input_precision="ieee")
    dq = dq * sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + (seq_start + offs_m)[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def _block_config(head_dim: int, dtype: torch.dtype, backward: bool) -> dict:
    """Block sizes and launch options. Under the interpreter small blocks keep several blocks per
    sequence at test sizes (so block-boundary code runs); on a GPU sizes follow the usual
    FlashAttention-2 Triton choices, halved for fp32 tiles (twice the shared memory)."""
    if is_interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    wide = dtype == torch.float32
    if not backward:
        if head_dim <= 64:
            return dict(BLOCK_M=64 if wide else 128, BLOCK_N=64, num_warps=4, num_stages=3)
        return dict(BLOCK_M=64 if wide else 128, BLOCK_N=32 if wide else 64, num_warps=8, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=32 if wide else 64, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32 if wide else 64, num_warps=8, num_stages=1)


# (kernel name, head_dim, dtype) -> config that compiled, after an out-of-resources retry
_WORKING_CONFIG: dict = {}


def _launch(kernel, key, cfg, grid_of, *args, **constexprs):
    """Launch ``kernel`` with ``cfg``; if the GPU reports out-of-resources (shared memory /
    registers on a smaller part than the one the defaults were chosen for), retry with fewer
    pipeline stages, then smaller blocks, down to 16 x 16, and remember what worked."""
    cfg = dict(_WORKING_CONFIG.get(key, cfg))
    while True:
        try:
            kernel[grid_of(cfg)](*args, **constexprs, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            _WORKING_CONFIG[key] = cfg
            return
        except Exception as err:
            if not is_out_of_resources(err):
                raise
            if cfg["num_stages"] > 1:
                cfg["num_stages"] -= 1
            elif max(cfg["BLOCK_M"], cfg["BLOCK_N"]) > 16:
                big = "BLOCK_M" if cfg["BLOCK_M"] >= cfg["BLOCK_N"] else "BLOCK_N"
                cfg[big] //= 2
            else:
                raise


def _check_inputs(q, k, v, layout: str) -> None:
    ndim = 4 if layout == "padded" else 3
    names = "(B, H, L, D)" if layout == "padded" else "(total_tokens, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"attention: {name} must be {names}, got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"attention: q, k, v must have the same shape (no cross-attention / GQA), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention: dtype {q.dtype} unsupported; use one of {SUPPORTED_DTYPES}")
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention: head dim {d} unsupported by the Triton kernel; supported: "
                         f"{SUPPORTED_HEAD_DIMS} (use attention_ref / SDPA for others)")
    # kernels index with int32 offsets, and (batch * heads) is a CUDA grid y-dimension
    for name, t in (("q", q), ("k", k), ("v", v)):
        span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
        if span >= 2**31:
            raise ValueError(f"attention: {name} spans {span} elements; the kernel's int32 offsets "
                             f"need < 2^31 (split the batch)")
    bh = q.shape[0] * q.shape[1] if layout == "padded" else None
    if bh is not None and bh > 65535:
        raise ValueError(f"attention: batch * heads = {bh} exceeds the CUDA grid limit 65535 "
                         f"(split the batch)")


def _autocast(q, k, v):
    """Like SDPA, follow an enclosing autocast region: compute in its lower-precision dtype."""
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        q, k, v = (t.to(dtype) for t in (q, k, v))
    return q, k, v


def _strides3(t: torch.Tensor, varlen: bool) -> Tuple[int, int, int]:
    """(batch, head, token) strides; in the varlen layout tokens carry the sequence offset."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _geometry(q, cu_seqlens, max_seqlen):
    """(batch, heads, padded seqlen passed to the kernel, rows of the grid)."""
    if cu_seqlens is None:
        B, H, L, _ = q.shape
        return B, H, L, L
    return cu_seqlens.numel() - 1, q.shape[1], 0, max_seqlen


def _lse_buffer(q, cu_seqlens):
    """fp32 log-sum-exp (log2 domain): (B, H, L) padded, (H, total) varlen; + its (b, h) strides."""
    if cu_seqlens is None:
        B, H, L, _ = q.shape
        lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
        return lse, (lse.stride(0), lse.stride(1))
    lse = torch.empty(q.shape[1], q.shape[0], device=q.device, dtype=torch.float32)
    return lse, (0, lse.stride(0))


def _kv_end(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B,) int32: 1 + index of the last kept key per row (0 for an all-padded row). Keys past it
    are skipped by the kernels, so right padding costs no attention work."""
    L = key_padding_mask.shape[1]
    pos = torch.arange(1, L + 1, device=key_padding_mask.device, dtype=torch.int32)
    return ((key_padding_mask != 0).to(torch.int32) * pos).amax(dim=1).to(torch.int32)


def _attn_forward(q, k, v, key_padding_mask, kv_end, cu_seqlens, max_seqlen, softmax_scale):
    varlen = cu_seqlens is not None
    B, H, L, grid_rows = _geometry(q, cu_seqlens, max_seqlen)
    if varlen:
        o = torch.empty_like(q, memory_format=torch.contiguous_format)  # (T, H, D)
    else:
        # (B, H, L, D) view of (B, L, H, D) memory: the usual ctx.transpose(1, 2).reshape(B, L, H*D)
        # that follows attention is then free instead of a copy
        o = torch.empty(B, L, H, q.shape[-1], device=q.device, dtype=q.dtype).transpose(1, 2)
    lse, lse_strides = _lse_buffer(q, cu_seqlens)
    D = q.shape[-1]
    kmask = key_padding_mask
    with device_context(q):
        _launch(
            _attn_fwd_kernel, ("fwd", D, q.dtype), _block_config(D, q.dtype, backward=False),
            lambda c: (cdiv(max(grid_rows, 1), c["BLOCK_M"]), B * H),
            q, k, v, o, lse, kmask if kmask is not None else q, kv_end if kv_end is not None else q,
            cu_seqlens if varlen else q,
            softmax_scale * _LOG2E,
            *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(o, varlen),
            *lse_strides,
            kmask.stride(0) if kmask is not None else 0,
            H, L,
            HEAD_DIM=D, VARLEN=varlen, HAS_KMASK=kmask is not None, UPCAST=upcast_dot(q.dtype),
        )
    return o, lse


def _attn_backward(do, q, k, v, o, lse, key_padding_mask, kv_end, cu_seqlens, max_seqlen, softmax_scale):
    varlen = cu_seqlens is not None
    do = _last_contiguous(do)
    B, H, L, grid_rows = _geometry(q, cu_seqlens, max_seqlen)
    lse_strides = (lse.stride(0), lse.stride(1)) if not varlen else (0, lse.stride(0))
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    D = q.shape[-1]
    cfg = _block_config(D, q.dtype, backward=True)
    kmask = key_padding_mask
    common = dict(HEAD_DIM=D, VARLEN=varlen, HAS_KMASK=kmask is not None, UPCAST=upcast_dot(q.dtype))
    tail = (kmask if kmask is not None else q, kv_end if kv_end is not None else q,
            cu_seqlens if varlen else q, softmax_scale * _LOG2E, softmax_scale)
    mstride = kmask.stride(0) if kmask is not None else 0
    rows = max(grid_rows, 1)
    with device_context(q):
        pre_block = 16 if is_interpreting() else 64
        _attn_bwd_preprocess_kernel[(cdiv(rows, pre_block), B * H)](
            o, do, delta, cu_seqlens if varlen else q,
            *_strides3(o, varlen), *_strides3(do, varlen), *lse_strides, H, L,
            HEAD_DIM=D, BLOCK_M=pre_block, VARLEN=varlen,
        )
        _launch(
            _attn_bwd_dkdv_kernel, ("dkdv", D, q.dtype), cfg,
            lambda c: (cdiv(rows, c["BLOCK_N"]), B * H),
            q, k, v, do, dk, dv, lse, delta, *tail,
            *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen),
            *_strides3(dk, varlen), *_strides3(dv, varlen), *lse_strides, mstride, H, L, **common,
        )
        _launch(
            _attn_bwd_dq_kernel, ("dq", D, q.dtype), cfg,
            lambda c: (cdiv(rows, c["BLOCK_M"]), B * H),
            q, k, v, do, dq, lse, delta, *tail,
            *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen),
            *_strides3(dq, varlen), *lse_strides, mstride, H, L, **common,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class AttentionFunction(torch.autograd.Function):
    """Padded form when ``cu_seqlens`` is None, varlen form otherwise."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, cu_seqlens, max_seqlen, softmax_scale):
        q, k, v = (_last_contiguous(t) for t in (q, k, v))  # the kernels assume unit stride over D
        kv_end = _kv_end(key_padding_mask) if key_padding_mask is not None else None
        o, lse = _attn_forward(q, k, v, key_padding_mask, kv_end, cu_seqlens, max_seqlen, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse, key_padding_mask, kv_end, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        ctx.softmax_scale = softmax_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kmask, kv_end, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse, kmask, kv_end, cu_seqlens, ctx.max_seqlen,
                                    ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: Optional[torch.Tensor] = None,
              softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Non-causal attention over q, k, v (B, H, L, D) -> (B, H, L, D), same dtype as q (inside an
    autocast region, q/k/v are first cast to the autocast dtype, as SDPA does). The output is a
    (B, H, L, D) view of (B, L, H, D) memory, so ``out.transpose(1, 2).reshape(B, L, H * D)`` is free.

    key_padding_mask: (B, L) bool (or 0/1 integer), **True / 1 = keep (real token)**; keys where it
    is False are ignored. Rows with no kept key return zeros. softmax_scale defaults to D**-0.5.
    """
    q, k, v = _autocast(q, k, v)
    _check_inputs(q, k, v, "padded")
    check_launchable("attention", q, k, v)
    B, H, L, D = q.shape
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, L):
            raise ValueError(f"attention: key_padding_mask must be (B, L) = {(B, L)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        # int8 so the kernel reads one byte per key; mask is constant, no grad
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()
    scale = float(softmax_scale) if softmax_scale is not None else D ** -0.5
    return AttentionFunction.apply(q, k, v, key_padding_mask, None, L, scale)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Non-causal attention over packed sequences, q, k, v (total_tokens, H, D) -> same shape.

    cu_seqlens: (B + 1,) int32 on q's device, cu_seqlens[0] = 0, cu_seqlens[-1] = total_tokens;
    sequence b is rows cu_seqlens[b]:cu_seqlens[b+1] and attends only within itself.
    max_seqlen: python int >= the longest sequence (sizes the launch grid; too small = rows skipped,
    so it is checked). Zero-length sequences are allowed.
    """
    q, k, v = _autocast(q, k, v)
    _check_inputs(q, k, v, "varlen")
    check_launchable("attention_varlen", q, k, v, cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"attention_varlen: cu_seqlens must be (B + 1,), got {tuple(cu_seqlens.shape)}")
    if (cu_seqlens.numel() - 1) * q.shape[1] > 65535:
        raise ValueError(f"attention_varlen: sequences * heads = {(cu_seqlens.numel() - 1) * q.shape[1]} "
                         f"exceeds the CUDA grid limit 65535 (split the batch)")
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    max_seqlen = int(max_seqlen)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    return AttentionFunction.apply(q, k, v, None, cu_seqlens, max_seqlen, scale)


def unpad_input(hidden: torch.Tensor, mask: torch.Tensor):
    """Drop padding: hidden (B, L, ...) and mask (B, L) (True / nonzero = real token) ->
    (packed (T, ...), indices (T,) int64 into the flattened B*L axis, cu_seqlens (B + 1,) int32,
    max_seqlen python int). Tokens are kept in (b, l) order, so a sequence's real tokens need not be
    a prefix. One host sync (for T and max_seqlen), like flash-attn's ``unpad_input``.
    """
    B, L = mask.shape
    mask = mask.bool()
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if B > 0 else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    packed = hidden.reshape(B * L, *hidden.shape[2:])[indices]
    return packed, indices, cu_seqlens, max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: packed (T, ...) -> (batch, seqlen, ...), zeros at padding."""
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    out = out.index_copy(0, indices, packed)  # out-of-place so autograd routes grads to `packed`
    return out.view(batch, seqlen, *packed.shape[1:])


# ----------------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------------
def attention_ref(q, k, v, key_padding_mask=None, softmax_scale=None):
    """Plain-torch reference for :func:`attention` (materializes L x L; computes in q's dtype)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, L, L)
    if key_padding_mask is None:
        return torch.matmul(torch.softmax(s, dim=-1), v)
    keep = key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
    s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
    # multiply by keep: a row with no kept key becomes 0 instead of a uniform average of padding
    p = torch.softmax(s, dim=-1) * keep
    return torch.matmul(p, v)


def attention_varlen_ref(q, k, v, cu_seqlens, max_seqlen=None, softmax_scale=None):
    """Plain-torch reference for :func:`attention_varlen`: one :func:`attention_ref` per sequence."""
    outs = []
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        seq = [t[s:e].transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, l, D)
        outs.append(attention_ref(*seq, softmax_scale=softmax_scale)[0].transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else torch.zeros_like(q)


# ----------------------------------------------------------------------------------------------
# nn.Module
# ----------------------------------------------------------------------------------------------
class TritonAttention(nn.Module):
    """Stateless module around :func:`attention` / :func:`attention_varlen`.

    forward(q, k, v, key_padding_mask=None) for (B, H, L, D) inputs, or
    forward(q, k, v, cu_seqlens=..., max_seqlen=...) for packed (total_tokens, H, D) inputs.
    """

    def __init__(self, softmax_scale: Optional[float] = None):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, q, k, v, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        if cu_seqlens is not None:
            if key_padding_mask is not None:
                raise ValueError("TritonAttention: pass key_padding_mask (padded) or cu_seqlens "
                                 "(varlen), not both")
            return attention_varlen(q, k, v, cu_seqlens, max_seqlen, self.softmax_scale)
        return attention(q, k, v, key_padding_mask, self.softmax_scale)

    def extra_repr(self) -> str:
        return f"softmax_scale={self.softmax_scale}"
