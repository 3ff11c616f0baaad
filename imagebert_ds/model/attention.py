"""Multi-head self-attention with a pluggable core (BERT, Devlin et al. 2019 §3; ImageBERT §3.1).

The whole attention *core* (softmax(QK^T/sqrt(d) + mask) V) lives in ``attention_core`` so the
kernels package can supply faster ones without touching the layers:

* ``eager``  — plain torch matmul/softmax, bit-for-bit the HF ``BertSelfAttention`` eager math.
* ``sdpa``   — ``torch.nn.functional.scaled_dot_product_attention`` (flash / mem-efficient on GPU).
* ``triton`` — ``imagebert_ds.kernels.attention`` (FlashAttention-2 in Triton) when
  ``imagebert_ds.kernels.triton_available()``; otherwise, or when attention dropout is active in
  training (the kernel has no dropout) or the head dim is unsupported, a notice is logged once and
  the call falls back to ``sdpa``.

Masks: ``key_padding_mask`` is (B, L) bool, True = real token (may be attended to), False = padding.
Query rows at padding positions are still computed; callers ignore them.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ATTN_IMPLS = ("eager", "sdpa", "triton")
_NOTICES: set[str] = set()


def notice_once(msg: str) -> None:
    """Log ``msg`` at WARNING level the first time it is seen in this process."""
    if msg not in _NOTICES:
        _NOTICES.add(msg)
        log.warning(msg)


def kernels_usable_on(t: torch.Tensor) -> bool:
    """Triton kernels launch on ``t``: CUDA tensors with triton + CUDA, or CPU tensors under
    TRITON_INTERPRET=1."""
    try:
        from imagebert_ds import kernels
        if not kernels.triton_available():
            return False
        return t.device.type == ("cpu" if kernels.is_interpreting() else "cuda")
    except Exception:  # a broken or older kernels package must not break the model
        return False


def _triton_kernel(q: torch.Tensor):
    """The kernels package's padded attention, or None (with a notice) when it cannot run on q."""
    try:
        from imagebert_ds import kernels
        fn = getattr(kernels, "attention", None)
    except Exception as e:
        notice_once(f"attn_impl='triton': importing imagebert_ds.kernels failed ({e}); using sdpa")
        return None
    if fn is None:
        notice_once("attn_impl='triton': imagebert_ds.kernels exposes no attention kernel; using sdpa")
        return None
    if not kernels_usable_on(q):
        notice_once(f"attn_impl='triton': Triton cannot run on {q.device} here (needs the `triton` "
                    f"package and CUDA, or TRITON_INTERPRET=1); using sdpa")
        return None
    return fn


def varlen_usable(x: torch.Tensor, impl: str, head_dim: int, dropout_p: float) -> bool:
    """The unpadded (packed, ``cu_seqlens``) Triton path can run for this forward: attn_impl
    'triton', kernels launchable on x, no attention dropout (the kernel has none), head dim
    supported. Otherwise the padded path runs (with its own fallback notices)."""
    return (impl == "triton" and dropout_p == 0.0 and head_dim in (16, 32, 64, 128)
            and kernels_usable_on(x))


def eager_attention(q, k, v, key_padding_mask=None, dropout_p: float = 0.0):
    """q, k, v (B, H, L, D); key_padding_mask (B, L) bool -> (B, H, L, D)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    if key_padding_mask is not None:
        # additive mask like HF: finfo.min, so a fully masked row degrades to uniform, not NaN
        add = (~key_padding_mask)[:, None, None, :].to(scores.dtype) * torch.finfo(scores.dtype).min
        scores = scores + add
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, key_padding_mask=None, dropout_p: float = 0.0):
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_padding_mask: Optional[torch.Tensor], dropout_p: float, impl: str) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for q, k, v (B, H, L, D); dropout_p already 0 in eval."""
    if impl == "eager":
        return eager_attention(q, k, v, key_padding_mask, dropout_p)
    if impl == "triton":
        fn = _triton_kernel(q)
        if fn is not None:
            if dropout_p > 0.0:
                notice_once("attn_impl='triton': the kernel has no attention dropout; using sdpa "
                            "while attention_probs_dropout_prob > 0 in training")
            elif q.shape[-1] not in (16, 32, 64, 128):
                notice_once(f"attn_impl='triton': head dim {q.shape[-1]} unsupported; using sdpa")
            else:
                return fn(q, k, v, key_padding_mask)
        return sdpa_attention(q, k, v, key_padding_mask, dropout_p)
    if impl == "sdpa":
        return sdpa_attention(q, k, v, key_padding_mask, dropout_p)
    raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")


class SelfAttention(nn.Module):
    """Q/K/V projections (separate, as in BERT, so checkpoints map 1:1) around ``attention_core``;
    the output projection lives in the layer (BERT's ``attention.output.dense``)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, impl: str):
        super().__init__()
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout
        self.impl = impl

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                varlen: Optional[tuple] = None) -> torch.Tensor:
        if varlen is not None:  # packed tokens x (T, hidden); varlen = (cu_seqlens, max_seqlen)
            from imagebert_ds.kernels import attention_varlen
            T = x.shape[0]
            split = lambda t: t.view(T, self.num_heads, self.head_dim)               # (T, H, D)
            o = attention_varlen(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                 varlen[0], varlen[1])                                # (T, H, D)
            return o.reshape(T, self.num_heads * self.head_dim)
        B, L, _ = x.shape
        split = lambda t: t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        p = self.dropout if self.training else 0.0
        o = attention_core(q, k, v, key_padding_mask, p, self.impl)  # (B, H, L, D)
        return o.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
