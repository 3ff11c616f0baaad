"""Flash attention in Triton (FlashAttention-2, Dao 2023, arXiv:2307.08691, Alg. 1/2): non-causal,
forward and backward, padded and packed (varlen) layouts, optional attention dropout.

Host launchers, the autograd Function, the functional API and torch references; the ``@triton.jit``
bodies are in ``_flash_attention_kernels.py``, the ``nn.Module`` is ``modules.TritonAttention``.
  * padded: q, k, v (B, H, L, D), optional ``key_padding_mask`` (B, L) bool, True = real token.
  * varlen: q, k, v (total_tokens, H, D) with ``cu_seqlens`` (B + 1,) int32 and ``max_seqlen`` int.
D must be in ``ATTENTION_HEAD_DIMS`` with a contiguous last dim. Fully masked rows give zeros.
Accumulation is fp32. Design (block loop, backward split, Philox dropout): docs/kernels.md.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._flash_attention_kernels import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_bwd_preprocess_kernel,
    _attn_fwd_kernel,
    _dropout_mask_kernel,
)
from ._utils import cdiv, check_launchable, device_context, is_interpreting, is_out_of_resources, upcast_dot

# What the Triton attention can take: the one table the model and the checks below consult.
ATTENTION_HEAD_DIMS = (16, 32, 64, 128)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_GRID_LIMIT = 65535  # CUDA grid y / z dimensions (batch * heads is axis 1)
_SEED_LIMIT = 2**31  # seeds travel as int32 kernel arguments


def attention_unsupported(head_dim: int, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when the Triton attention kernels take this head dim (and dtype, if given), else a
    one-line reason, e.g. for a fallback notice. Imports no triton; says nothing about whether
    triton can run here (that is :func:`imagebert_ds.kernels.why_unavailable`)."""
    if head_dim not in ATTENTION_HEAD_DIMS:
        return (f"head dim {head_dim} unsupported by the Triton attention kernel (supported: "
                f"{', '.join(map(str, ATTENTION_HEAD_DIMS))})")
    if dtype is not None and dtype not in ATTENTION_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in ATTENTION_DTYPES)
        return f"dtype {dtype} unsupported by the Triton attention kernel (supported: {names})"
    return None


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def _block_config(head_dim: int, dtype: torch.dtype, backward: bool, dropout: bool = False) -> dict:
    """Block sizes and launch options. Under the interpreter small blocks keep several blocks per
    sequence at test sizes (so block-boundary code runs); on a GPU sizes follow the usual
    FlashAttention-2 Triton choices, halved for fp32 tiles (twice the shared memory). With dropout
    the forward at D <= 64 runs 8 warps: the Philox state of a 128 x 64 tile spills registers with
    4 (sm_90 ptxas: ~400 B spilled at 4 warps, none at 8); the backward's blocks spill <= 16 B."""
    if is_interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    wide = dtype == torch.float32
    if not backward:
        if head_dim <= 64:
            return dict(BLOCK_M=64 if wide else 128, BLOCK_N=64, num_warps=8 if dropout else 4, num_stages=3)
        return dict(BLOCK_M=64 if wide else 128, BLOCK_N=32 if wide else 64, num_warps=8, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=32 if wide else 64, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32 if wide else 64, num_warps=8, num_stages=1)


# (kernel name, head_dim, dtype, dropout) -> config that compiled, after an out-of-resources retry
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
    reason = attention_unsupported(q.shape[-1], q.dtype)
    if reason is not None:
        raise ValueError(f"attention: {reason}; use attention_ref / SDPA")
    # kernels index with int32 offsets, and (batch * heads) is a CUDA grid y-dimension
    for name, t in (("q", q), ("k", k), ("v", v)):
        span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
        if span >= 2**31:
            raise ValueError(f"attention: {name} spans {span} elements; the kernel's int32 offsets "
                             f"need < 2^31 (split the batch)")
    bh = q.shape[0] * q.shape[1] if layout == "padded" else None
    if bh is not None and bh > _GRID_LIMIT:
        raise ValueError(f"attention: batch * heads = {bh} exceeds the CUDA grid limit {_GRID_LIMIT} "
                         f"(split the batch)")


def _dropout_args(op: str, dropout_p: float, seed: Optional[int]) -> Tuple[float, int]:
    """Validated (p, seed). With p > 0 and no seed, one is drawn from torch's default CPU
    generator: no device sync, reproducible under ``torch.manual_seed``, and replayed by
    activation checkpointing (``preserve_rng_state`` restores the CPU RNG state) and by training
    checkpoints that store ``torch.get_rng_state()``. p == 0 draws nothing."""
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:  # also rejects NaN
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if seed is not None:
        try:
            index = operator.index(seed)  # python / numpy ints; not floats
        except TypeError:
            index = -1
        if isinstance(seed, bool) or not 0 <= index < _SEED_LIMIT:
            raise ValueError(f"{op}: seed must be an int in [0, 2**31), got {seed!r}")
        seed = index
    if p == 0.0:
        return 0.0, 0
    if seed is None:
        seed = int(torch.randint(0, _SEED_LIMIT - 1, (1,)).item())  # CPU generator: .item() is free
    return p, seed


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
    """(batch, heads, max_seqlen passed to the kernels): L padded, max_seqlen varlen. It is the
    padded layout's sequence length, the grid's row count and the dropout counter's stride."""
    if cu_seqlens is None:
        B, H, L, _ = q.shape
        return B, H, L
    return cu_seqlens.numel() - 1, q.shape[1], max_seqlen


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


def _attn_forward(q, k, v, key_padding_mask, kv_end, cu_seqlens, max_seqlen, softmax_scale,
                  dropout_p, seed):
    varlen = cu_seqlens is not None
    B, H, L = _geometry(q, cu_seqlens, max_seqlen)
    if varlen:
        o = torch.empty_like(q, memory_format=torch.contiguous_format)  # (T, H, D)
    else:
        # (B, H, L, D) view of (B, L, H, D) memory: the usual ctx.transpose(1, 2).reshape(B, L, H*D)
        # that follows attention is then free instead of a copy
        o = torch.empty(B, L, H, q.shape[-1], device=q.device, dtype=q.dtype).transpose(1, 2)
    lse, lse_strides = _lse_buffer(q, cu_seqlens)
    D = q.shape[-1]
    kmask = key_padding_mask
    dropout = dropout_p > 0
    with device_context(q):
        _launch(
            _attn_fwd_kernel, ("fwd", D, q.dtype, dropout), _block_config(D, q.dtype, False, dropout),
            lambda c: (cdiv(max(L, 1), c["BLOCK_M"]), B * H),
            q, k, v, o, lse, kmask if kmask is not None else q, kv_end if kv_end is not None else q,
            cu_seqlens if varlen else q,
            softmax_scale * _LOG2E, dropout_p, seed,
            *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(o, varlen),
            *lse_strides,
            kmask.stride(0) if kmask is not None else 0,
            H, L,
            HEAD_DIM=D, VARLEN=varlen, HAS_KMASK=kmask is not None, DROPOUT=dropout, UPCAST=upcast_dot(q.dtype),
        )
    return o, lse


def _attn_backward(do, q, k, v, o, lse, key_padding_mask, kv_end, cu_seqlens, max_seqlen, softmax_scale,
                   dropout_p, seed):
    varlen = cu_seqlens is not None
    do = _last_contiguous(do)
    B, H, L = _geometry(q, cu_seqlens, max_seqlen)
    lse_strides = (lse.stride(0), lse.stride(1)) if not varlen else (0, lse.stride(0))
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    D = q.shape[-1]
    cfg = _block_config(D, q.dtype, backward=True)
    kmask = key_padding_mask
    dropout = dropout_p > 0
    common = dict(HEAD_DIM=D, VARLEN=varlen, HAS_KMASK=kmask is not None, DROPOUT=dropout,
                  UPCAST=upcast_dot(q.dtype))
    tail = (kmask if kmask is not None else q, kv_end if kv_end is not None else q,
            cu_seqlens if varlen else q, softmax_scale * _LOG2E, softmax_scale, dropout_p, seed)
    mstride = kmask.stride(0) if kmask is not None else 0
    rows = max(L, 1)
    with device_context(q):
        pre_block = 16 if is_interpreting() else 64
        _attn_bwd_preprocess_kernel[(cdiv(rows, pre_block), B * H)](
            o, do, delta, cu_seqlens if varlen else q,
            *_strides3(o, varlen), *_strides3(do, varlen), *lse_strides, H, L,
            HEAD_DIM=D, BLOCK_M=pre_block, VARLEN=varlen,
        )
        _launch(
            _attn_bwd_dkdv_kernel, ("dkdv", D, q.dtype, dropout), cfg,
            lambda c: (cdiv(rows, c["BLOCK_N"]), B * H),
            q, k, v, do, dk, dv, lse, delta, *tail,
            *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen),
            *_strides3(dk, varlen), *_strides3(dv, varlen), *lse_strides, mstride, H, L, **common,
        )
        _launch(
            _attn_bwd_dq_kernel, ("dq", D, q.dtype, dropout), cfg,
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
    """Autograd wrapper of the kernels: padded form when ``cu_seqlens`` is None, varlen form
    otherwise. Inputs are checked by :func:`attention` / :func:`attention_varlen`; ``seed`` is only
    read when ``dropout_p > 0``. Saves q, k, v, O and the lse; the dropout mask is regenerated."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, cu_seqlens, max_seqlen, softmax_scale,
                dropout_p=0.0, seed=0):
        """O in q's layout (padded: a (B, H, L, D) view of (B, L, H, D) memory)."""
        q, k, v = (_last_contiguous(t) for t in (q, k, v))  # the kernels assume unit stride over D
        kv_end = _kv_end(key_padding_mask) if key_padding_mask is not None else None
        o, lse = _attn_forward(q, k, v, key_padding_mask, kv_end, cu_seqlens, max_seqlen, softmax_scale,
                               dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse, key_padding_mask, kv_end, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        ctx.softmax_scale = softmax_scale
        ctx.dropout = (dropout_p, seed)
        return o

    @staticmethod
    def backward(ctx, do):
        """dq, dk, dv (contiguous); the other inputs get None."""
        q, k, v, o, lse, kmask, kv_end, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse, kmask, kv_end, cu_seqlens, ctx.max_seqlen,
                                    ctx.softmax_scale, *ctx.dropout)
        return dq, dk, dv, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: Optional[torch.Tensor] = None, *,
              dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
              seed: Optional[int] = None) -> torch.Tensor:
    """Non-causal attention over q, k, v (B, H, L, D) -> (B, H, L, D), same dtype as q (inside an
    autocast region, q/k/v are first cast to the autocast dtype, as SDPA does). The output is a
    (B, H, L, D) view of (B, L, H, D) memory, so ``out.transpose(1, 2).reshape(B, L, H * D)`` is free.

    key_padding_mask: (B, L) bool (or 0/1 integer), **True / 1 = keep (real token)**; keys where it
    is False are ignored. Rows with no kept key return zeros. softmax_scale defaults to D**-0.5.
    dropout_p in [0, 1): attention dropout on the softmax probabilities (the caller passes 0 in
    eval). With dropout_p > 0, ``seed`` (python int in [0, 2**31)) keys the mask, which
    ``attention_dropout_mask(seed, B, H, L, L, dropout_p)`` returns; if None, a seed is drawn from
    torch's default CPU generator (``torch.manual_seed`` reproduces it). Arguments after
    key_padding_mask are keyword-only, so an old positional softmax_scale cannot become dropout_p.
    """
    q, k, v = _autocast(q, k, v)
    _check_inputs(q, k, v, "padded")
    dropout_p, seed = _dropout_args("attention", dropout_p, seed)
    check_launchable("attention", q, k, v)
    B, H, L, D = q.shape
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, L):
            raise ValueError(f"attention: key_padding_mask must be (B, L) = {(B, L)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        # int8 so the kernel reads one byte per key; mask is constant, no grad
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()
    scale = float(softmax_scale) if softmax_scale is not None else D ** -0.5
    return AttentionFunction.apply(q, k, v, key_padding_mask, None, L, scale, dropout_p, seed)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                     seed: Optional[int] = None) -> torch.Tensor:
    """Non-causal attention over packed sequences, q, k, v (total_tokens, H, D) -> same shape.

    cu_seqlens: (B + 1,) int32 on q's device, cu_seqlens[0] = 0, cu_seqlens[-1] = total_tokens;
    sequence b is rows cu_seqlens[b]:cu_seqlens[b+1] and attends only within itself.
    max_seqlen: python int >= the longest sequence. It sizes the launch grid and strides the
    dropout counter; it is not checked (that would need a host sync): too small skips rows.
    Zero-length sequences are allowed. dropout_p / softmax_scale / seed as in :func:`attention`;
    the keep-mask of sequence b is ``attention_dropout_mask(seed, B, H, max_seqlen, max_seqlen,
    dropout_p)[b, :, :len_b, :len_b]``.
    """
    q, k, v = _autocast(q, k, v)
    _check_inputs(q, k, v, "varlen")
    dropout_p, seed = _dropout_args("attention_varlen", dropout_p, seed)
    check_launchable("attention_varlen", q, k, v, cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"attention_varlen: cu_seqlens must be (B + 1,), got {tuple(cu_seqlens.shape)}")
    if (cu_seqlens.numel() - 1) * q.shape[1] > _GRID_LIMIT:
        raise ValueError(f"attention_varlen: sequences * heads = {(cu_seqlens.numel() - 1) * q.shape[1]} "
                         f"exceeds the CUDA grid limit {_GRID_LIMIT} (split the batch)")
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    max_seqlen = int(max_seqlen)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    return AttentionFunction.apply(q, k, v, None, cu_seqlens, max_seqlen, scale, dropout_p, seed)


def attention_dropout_mask(seed: int, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
                           dropout_p: float, device=None) -> torch.Tensor:
    """The exact keep-mask (True = kept) that the attention kernels use for ``seed``: bool
    (batch, heads, seqlen_q, seqlen_k), from the same Triton helper. For :func:`attention` pass
    seqlen_q = seqlen_k = L; for :func:`attention_varlen` pass max_seqlen for both and read
    sequence b's mask at ``[b, :, :len_b, :len_b]``. For tests and debugging (it materializes
    the full mask); ``device`` defaults to CUDA, or the CPU under the interpreter."""
    if seed is None:
        raise ValueError("attention_dropout_mask: pass the seed the attention call used")
    p, seed = _dropout_args("attention_dropout_mask", dropout_p, seed)
    if p == 0.0:  # uniform >= 0 always: everything kept
        return torch.ones(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if device is None:
        device = "cpu" if is_interpreting() else "cuda"
    keep = torch.empty(batch, heads, seqlen_q, seqlen_k, dtype=torch.int8, device=device)
    check_launchable("attention_dropout_mask", keep)
    if batch * heads > _GRID_LIMIT:
        raise ValueError(f"attention_dropout_mask: batch * heads = {batch * heads} exceeds the CUDA "
                         f"grid limit {_GRID_LIMIT}")
    if keep.numel() == 0:
        return keep.view(torch.bool)
    block = 16 if is_interpreting() else 64
    with device_context(keep):
        _dropout_mask_kernel[(cdiv(seqlen_q, block), batch * heads, cdiv(seqlen_k, block))](
            keep, p, seed, seqlen_q, seqlen_k, BLOCK_M=block, BLOCK_N=block,
        )
    return keep.view(torch.bool)  # 0 / 1 bytes: a valid bool view, no copy


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
def attention_ref(q, k, v, key_padding_mask=None, *, dropout_p: float = 0.0, softmax_scale=None,
                  dropout_mask=None):
    """Plain-torch reference for :func:`attention` (materializes L x L; computes in q's dtype).
    With dropout_p > 0, ``dropout_mask`` (B, H, L, L) bool (True = kept; e.g. from
    :func:`attention_dropout_mask`) is applied as mask / (1 - dropout_p) after the softmax."""
    if dropout_p > 0 and dropout_mask is None:
        raise ValueError("attention_ref: dropout_p > 0 needs the dropout_mask to apply")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, L, L)
    if key_padding_mask is None:
        p = torch.softmax(s, dim=-1)
    else:
        keep = key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        # multiply by keep: a row with no kept key becomes 0 instead of a uniform average of padding
        p = torch.softmax(s, dim=-1) * keep
    if dropout_p > 0:
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    return torch.matmul(p, v)


def attention_varlen_ref(q, k, v, cu_seqlens, max_seqlen=None, *, dropout_p: float = 0.0,
                         softmax_scale=None, dropout_mask=None):
    """Plain-torch reference for :func:`attention_varlen`: one :func:`attention_ref` per sequence.
    dropout_mask: (B, H, max_seqlen, max_seqlen) bool as :func:`attention_dropout_mask` returns;
    sequence b uses its [b, :, :len_b, :len_b] corner."""
    outs = []
    bounds = cu_seqlens.tolist()
    for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq = [t[s:e].transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, l, D)
        mask = dropout_mask[b:b + 1, :, :e - s, :e - s] if dropout_mask is not None else None
        outs.append(attention_ref(*seq, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                  dropout_mask=mask)[0].transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else torch.zeros_like(q)
