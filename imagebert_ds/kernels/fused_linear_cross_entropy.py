"""Fused MLM decoder + cross-entropy, chunked over tokens so (tokens x vocab) logits never exist.

Follows Liger-Kernel's ``ops/fused_linear_cross_entropy.py``: loss and gradients are computed in
the forward, one (chunk x V) buffer at a time, over rows with label != ignore_index only; the
backward scales them by grad_output. The ``nn.Module`` is ``modules.FusedMLMLoss``; design:
docs/kernels.md.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._utils import cdiv, check_launchable, device_context, is_interpreting, jit, next_power_of_2, tl

MAX_BLOCK_V = 32768  # vocab elements per loop step on a GPU (Liger-Kernel uses 65536 // 2)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
@jit
def _ce_fwd_bwd_kernel(
    LOGITS, stride_row, LABELS, LOSS,
    n_cols, inv_n,
    BLOCK_V: tl.constexpr,
):
    """One program per row: loss = logsumexp(x) - x[y]; x <- (softmax(x) - onehot(y)) * inv_n."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    y = tl.load(LABELS + row)

    # pass 1: online max / sum of exp in fp32
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    x_y = tl.load(ptr + y).to(tl.float32)
    tl.store(LOSS + row, lse - x_y)

    # pass 2: gradient of the mean loss w.r.t. the logits, written over the logits
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < n_cols
        x = tl.load(ptr + cols, mask=ok, other=float("-inf")).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)
        tl.store(ptr + cols, (g * inv_n).to(LOGITS.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def _block_v(vocab: int) -> int:
    if is_interpreting():
        return min(128, next_power_of_2(vocab))  # several loop steps at test vocab sizes
    return min(MAX_BLOCK_V, next_power_of_2(vocab))


def _ce_inplace(logits: torch.Tensor, labels: torch.Tensor, loss_out: torch.Tensor, inv_n: float):
    """logits (c, V) contiguous rows; overwritten with the gradient; per-row losses -> loss_out."""
    n_rows, vocab = logits.shape
    block = _block_v(vocab)
    num_warps = 32 if block >= 32768 else (16 if block >= 8192 else (8 if block >= 2048 else 4))
    if is_interpreting():
        num_warps = 1
    with device_context(logits):
        _ce_fwd_bwd_kernel[(n_rows,)](logits, logits.stride(0), labels, loss_out, vocab, inv_n,
                                      BLOCK_V=block, num_warps=num_warps)


MIN_CHUNK = 512  # rows; below this the decoder GEMMs re-read W for little work (memory-bound)


def default_chunk_size(n_rows: int, hidden: int, vocab: int) -> int:
    """Liger-Kernel's heuristic -- a (chunk x V) logits block about as large as the (n x H) hidden
    rows -- with a floor of MIN_CHUNK rows: each chunk reads all of W twice and updates grad_W, so
    tiny chunks trade a few MB of logits for many passes over a 47 MB (BERT) decoder matrix."""
    inc = cdiv(vocab, hidden)
    return max(1, min(n_rows, max(MIN_CHUNK, next_power_of_2(cdiv(n_rows, inc)))))


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def _fused_lce_forward(h, weight, bias, labels, chunk_size):
    """h (n, H), weight (V, H), bias (V,) or None, labels (n,) in [0, V). All n rows count."""
    n, H = h.shape
    V = weight.shape[0]
    dtype = _compute_dtype(h)
    need_w = weight.requires_grad
    need_b = bias is not None and bias.requires_grad
    with torch.autocast(h.device.type, enabled=False):
        hc_all = h.to(dtype)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        chunk = chunk_size or default_chunk_size(n, H, V)
        n_chunks = cdiv(n, chunk)
        loss_rows = torch.empty(n, device=h.device, dtype=torch.float32)
        grad_h = torch.empty((n, H), device=h.device, dtype=dtype)
        # The logits gradient is kept un-normalized (softmax - onehot, entries in [-1, 1]) and the
        # 1/n is applied once at the end: in fp16, (softmax - onehot) / n would underflow for rare
        # tokens before a GradScaler's loss scale could lift it, so fp16 grads stay fp32 and
        # un-normalized until the backward multiplies by (grad_output / n).
        keep_fp32 = torch.float16 in (dtype, weight.dtype)
        # several chunks (or fp16): accumulate grad_W in fp32 (V x H x 4 bytes); else none needed
        grad_w = (torch.zeros((V, H), device=h.device, dtype=torch.float32)
                  if need_w and (n_chunks > 1 or keep_fp32) else None)
        grad_b = torch.zeros(V, device=h.device, dtype=torch.float32) if need_b else None
        buf = torch.empty((min(chunk, n), V), device=h.device, dtype=dtype)
        inv_n = 1.0 / n
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            hc = hc_all[start:end]  # (c, H)
            logits = buf[: end - start]  # (c, V)
            if b is not None:
                torch.addmm(b, hc, w.t(), out=logits)
            else:
                torch.mm(hc, w.t(), out=logits)
            _ce_inplace(logits, labels[start:end], loss_rows[start:end], 1.0)
            g = logits  # now n * d(mean loss) / d(logits), (c, V)
            torch.mm(g, w, out=grad_h[start:end])
            if need_w:
                if grad_w is None:
                    grad_w = g.t() @ hc
                elif dtype == torch.float32:
                    grad_w.addmm_(g.t(), hc)
                else:
                    grad_w.add_(g.t() @ hc)  # in-place promotion: no fp32 (V x H) temporary
            if need_b:
                grad_b += g.sum(0, dtype=torch.float32)
        loss = loss_rows.sum() * inv_n
        if keep_fp32:
            return loss, grad_h, grad_w, grad_b, inv_n  # normalized in the backward
        grad_h.mul_(inv_n)
        if grad_w is not None:
            grad_w = grad_w.mul_(inv_n).to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.mul_(inv_n).to(bias.dtype)
    return loss, grad_h, grad_w, grad_b, 1.0


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Mean CE of (h @ W^T + b) against labels; every row of h counts (select beforehand)."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk_size):
        """fp32 scalar loss; all gradients are computed here and stored for the backward."""
        if h.shape[0] == 0:
            # nothing to predict: loss 0 and zero (not missing) grads, so every parameter still
            # gets a gradient as data-parallel reducers expect (torch's CE would give NaN)
            gw = torch.zeros_like(weight) if weight.requires_grad else None
            gb = torch.zeros_like(bias) if bias is not None and bias.requires_grad else None
            ctx.save_for_backward(torch.zeros_like(h), gw, gb)
            ctx.pending_scale = 1.0
            ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
            return torch.zeros((), device=h.device, dtype=torch.float32)
        loss, gh, gw, gb, pending = _fused_lce_forward(h, weight, bias, labels, chunk_size)
        ctx.save_for_backward(gh, gw, gb)
        ctx.pending_scale = pending  # 1/n still to apply (fp16), else 1
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        """The stored gradients of h, weight, bias scaled by grad_out (and a pending 1/n for fp16)."""
        scale = grad_out.to(torch.float32) * ctx.pending_scale
        grads = []
        for g, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            if g is None:
                grads.append(None)
            elif g.dtype == dtype:
                grads.append(g * scale.to(dtype))
            else:  # fp32 (fp16 path) or compute-dtype grads: scale in fp32, then cast once
                grads.append((g.float() * scale).to(dtype))
        return grads[0], grads[1], grads[2], None, None


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def mlm_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             labels: torch.Tensor, ignore_index: int = -100,
             chunk_size: Optional[int] = None) -> torch.Tensor:
    """Mean cross-entropy of the MLM decoder ``hidden @ weight.T + bias`` over labelled rows.

    hidden (..., H) -- the output of the MLM transform (dense + GELU + LayerNorm), either the full
    sequence or rows already gathered at the masked positions; labels (...) int64 with
    ``ignore_index`` (-100) at rows that do not count; weight (V, H) (the tied word embeddings);
    bias (V,) or None. Returns an fp32 scalar: sum of per-row CE / number of counted rows, and 0.0
    (not NaN) when no row counts. Gradients flow to hidden (zero at ignored rows), weight, bias.
    The (rows x V) logits are only ever materialized ``chunk_size`` rows at a time.
    """
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"mlm_loss: weight must be (V, {H}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"mlm_loss: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"mlm_loss: labels shape {tuple(labels.shape)} must equal hidden's leading "
                         f"dims {tuple(hidden.shape[:-1])}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"mlm_loss: chunk_size must be >= 1, got {chunk_size}")
    check_launchable("mlm_loss", hidden, weight, bias)
    h = hidden.reshape(-1, H)
    y = labels.reshape(-1)
    keep = y != ignore_index
    if not bool(keep.all()):  # one host sync; skipped in cost only by passing pre-gathered rows
        h, y = h[keep], y[keep]
    V = weight.shape[0]
    if y.numel() and bool(((y < 0) | (y >= V)).any()):
        bad = y[(y < 0) | (y >= V)][0].item()
        raise ValueError(f"mlm_loss: label {bad} outside [0, {V}) (ignore_index is {ignore_index})")
    return FusedLinearCrossEntropyFunction.apply(h, weight, bias, y.contiguous(), chunk_size)


def mlm_loss_ref(hidden, weight, bias, labels, ignore_index: int = -100):
    """Plain-torch reference: full logits + F.cross_entropy; 0 when no row counts."""
    H = hidden.shape[-1]
    logits = torch.nn.functional.linear(hidden.reshape(-1, H), weight, bias)
    y = labels.reshape(-1)
    if not bool((y != ignore_index).any()):
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits,
                                             y, ignore_index=ignore_index)
