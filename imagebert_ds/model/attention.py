"""Multi-head self-attention with a pluggable core (BERT, Devlin et al. 2019 §3; ImageBERT §3.1).

The core softmax(QK^T/sqrt(d) + mask) V is chosen from ``ATTENTION_BACKENDS`` by ``attn_impl``:
``eager`` (HF's eager math), ``sdpa`` (torch SDPA) or ``triton`` (``kernels.modules.TritonAttention``,
run unpadded). A backend that cannot run is an error, never a silent switch.
``key_padding_mask`` is (B, L) bool, True = real token.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from imagebert_ds.kernels.modules import TritonAttention

from .backends import require_triton


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


class _TorchAttention(nn.Module):
    """A stateless attention core over a torch function ``attend(q, k, v, key_padding_mask,
    dropout_p)`` (a subclass sets ``attend``); ``dropout_p`` applies in training mode only."""

    def __init__(self, dropout_p: float = 0.0):
        super().__init__()
        self.dropout_p = dropout_p

    def forward(self, q, k, v, key_padding_mask=None):
        """q, k, v (B, H, L, D); key_padding_mask (B, L) bool -> (B, H, L, D)."""
        return self.attend(q, k, v, key_padding_mask, self.dropout_p if self.training else 0.0)

    def extra_repr(self) -> str:
        """Shown by print(module)."""
        return f"dropout_p={self.dropout_p}"


class EagerAttention(_TorchAttention):
    """The ``eager`` core: :func:`eager_attention`."""
    attend = staticmethod(eager_attention)


class SdpaAttention(_TorchAttention):
    """The ``sdpa`` core: :func:`sdpa_attention`."""
    attend = staticmethod(sdpa_attention)


#: attn_impl -> attention core Module class, built as ``cls(dropout_p=...)``; called as
#: ``core(q, k, v, key_padding_mask)`` on (B, H, L, D) (the triton core also takes packed
#: ``core(q, k, v, cu_seqlens=..., max_seqlen=...)`` on (T, H, D))
ATTENTION_BACKENDS = {"eager": EagerAttention, "sdpa": SdpaAttention, "triton": TritonAttention}


def check_backend(impl: str) -> None:
    """Raise when ``attn_impl`` names no backend, or one that cannot run in this process."""
    if impl not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_impl must be one of {tuple(ATTENTION_BACKENDS)}, got {impl!r}")
    if impl == "triton":
        require_triton("attn_impl 'triton'")


class SelfAttention(nn.Module):
    """Q/K/V projections (separate, as in BERT, so checkpoints map 1:1) around the attention
    core ``self.core`` (``ATTENTION_BACKENDS[impl]``); the output projection lives in
    ``SelfOutput`` (BERT's ``attention.output``)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, impl: str):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout
        self.set_impl(impl)

    def set_impl(self, impl: str) -> None:
        """Use the core of backend ``impl`` (parameter-free: the state dict does not change)."""
        check_backend(impl)
        self.impl = impl
        self.core = ATTENTION_BACKENDS[impl](dropout_p=self.dropout).train(self.training)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                varlen: Optional[tuple] = None) -> torch.Tensor:
        """x (B, L, hidden) with a (B, L) mask, or packed real tokens x (T, hidden) with
        ``varlen`` = (cu_seqlens, max_seqlen) (triton core only) -> same layout as x."""
        if varlen is not None:
            T = x.shape[0]
            split = lambda t: t.view(T, self.num_heads, self.head_dim)               # (T, H, D)
            o = self.core(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                          cu_seqlens=varlen[0], max_seqlen=varlen[1])                # (T, H, D)
            return o.reshape(T, self.num_heads * self.head_dim)
        B, L, _ = x.shape
        split = lambda t: t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        o = self.core(q, k, v, key_padding_mask)                                     # (B, H, L, D)
        return o.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
