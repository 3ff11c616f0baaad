"""Multi-head self-attention with a pluggable core (BERT, Devlin et al. 2019 §3; ImageBERT §3.1).

The attention *core* (softmax(QK^T/sqrt(d) + mask) V, with dropout on the probabilities) is chosen
from ``ATTENTION_BACKENDS`` by ``attn_impl``:

* ``eager``  — plain torch matmul/softmax, bit-for-bit the HF ``BertSelfAttention`` eager math.
* ``sdpa``   — ``torch.nn.functional.scaled_dot_product_attention`` (flash / mem-efficient on GPU).
* ``triton`` — ``imagebert_ds.kernels.attention`` (FlashAttention-2 in Triton, dropout inside the
  kernel); the encoder then runs unpadded (``kernels.attention_varlen``, see encoder.py).

A backend that cannot run is an error, never a silent switch: an unsupported head dim is refused
by ``ImageBERTConfig``, missing Triton when the model is built, a device the kernels cannot run on
at the first forward pass (``backends``).

Masks: ``key_padding_mask`` is (B, L) bool, True = real token (may be attended to), False = padding.
Query rows at padding positions are still computed; callers ignore them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backends import check_launchable, require_kernel


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
    """torch SDPA on q, k, v (B, H, L, D) with a (B, L) keep-mask -> (B, H, L, D)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def triton_attention(q, k, v, key_padding_mask=None, dropout_p: float = 0.0):
    """The Triton flash-attention kernel on q, k, v (B, H, L, D) -> (B, H, L, D)."""
    from imagebert_ds.kernels import attention

    check_launchable(q, "attn_impl 'triton'")
    return attention(q, k, v, key_padding_mask, dropout_p=dropout_p)


#: attn_impl -> attention core (q, k, v, key_padding_mask, dropout_p) -> output
ATTENTION_BACKENDS = {"eager": eager_attention, "sdpa": sdpa_attention, "triton": triton_attention}


def check_backend(impl: str) -> None:
    """Raise when ``attn_impl`` names no backend, or one that cannot run in this process."""
    if impl not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_impl must be one of {tuple(ATTENTION_BACKENDS)}, got {impl!r}")
    if impl == "triton":
        require_kernel("attention", "attn_impl 'triton'")


class SelfAttention(nn.Module):
    """Q/K/V projections (separate, as in BERT, so checkpoints map 1:1) around the attention
    core; the output projection lives in ``SelfOutput`` (BERT's ``attention.output``)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, impl: str):
        super().__init__()
        check_backend(impl)
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout
        self.impl = impl

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                varlen: Optional[tuple] = None) -> torch.Tensor:
        """x (B, L, hidden) with a (B, L) mask, or packed real tokens x (T, hidden) with
        ``varlen`` = (cu_seqlens, max_seqlen) -> same layout as x."""
        p = self.dropout if self.training else 0.0
        if varlen is not None:
            from imagebert_ds.kernels import attention_varlen
            T = x.shape[0]
            split = lambda t: t.view(T, self.num_heads, self.head_dim)               # (T, H, D)
            o = attention_varlen(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                 varlen[0], varlen[1], dropout_p=p)                   # (T, H, D)
            return o.reshape(T, self.num_heads * self.head_dim)
        B, L, _ = x.shape
        split = lambda t: t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        o = ATTENTION_BACKENDS[self.impl](q, k, v, key_padding_mask, p)              # (B, H, L, D)
        return o.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
