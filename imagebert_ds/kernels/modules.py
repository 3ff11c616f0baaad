"""The ``nn.Module`` layer over the Triton ops (Liger-Kernel's ``transformers/`` layer): what the
model builds and calls. Each holds its options (and, for the LayerNorm, its parameters) and calls
one functional entry point of an ops file; the contracts are those functions'.

* ``TritonAttention``   -> ``flash_attention.attention`` / ``attention_varlen``
* ``FusedAddLayerNorm`` -> ``layernorm.add_layernorm``
* ``FusedMLMLoss``      -> ``fused_linear_cross_entropy.mlm_loss``
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .flash_attention import attention, attention_varlen
from .fused_linear_cross_entropy import mlm_loss
from .layernorm import add_layernorm


class TritonAttention(nn.Module):
    """Stateless attention core: ``forward(q, k, v, key_padding_mask=None)`` on (B, H, L, D), or
    ``forward(q, k, v, cu_seqlens=..., max_seqlen=...)`` on packed (total_tokens, H, D).
    ``dropout_p`` applies in training mode only, as in flash-attn's ``FlashSelfAttention``."""

    def __init__(self, softmax_scale: Optional[float] = None, dropout_p: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"TritonAttention: dropout_p must be in [0, 1), got {dropout_p!r}")
        self.softmax_scale = softmax_scale
        self.dropout_p = dropout_p

    def forward(self, q, k, v, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        """Attention output in the input's layout; see the class docstring."""
        p = self.dropout_p if self.training else 0.0
        if cu_seqlens is not None:
            if key_padding_mask is not None:
                raise ValueError("TritonAttention: pass key_padding_mask (padded) or cu_seqlens "
                                 "(varlen), not both")
            return attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=p,
                                    softmax_scale=self.softmax_scale)
        return attention(q, k, v, key_padding_mask, dropout_p=p, softmax_scale=self.softmax_scale)

    def extra_repr(self) -> str:
        """Shown by print(module)."""
        return f"softmax_scale={self.softmax_scale}, dropout_p={self.dropout_p}"


class FusedAddLayerNorm(nn.Module):
    """``LayerNorm(x + residual)`` in one kernel; ``nn.LayerNorm``'s parameter names (``weight``,
    ``bias``), so HF BERT ``LayerNorm.*`` checkpoint keys load unchanged."""

    def __init__(self, hidden_size: int, eps: float = 1e-12, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (hidden_size,)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """LN(x + residual) with this module's weight and bias (residual None: plain LN)."""
        return add_layernorm(x, residual, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        """Shown by print(module), like nn.LayerNorm's."""
        return f"{self.normalized_shape[0]}, eps={self.eps}"


class FusedMLMLoss(nn.Module):
    """Parameter-free: ``forward(hidden, weight, bias, labels)`` -> mean CE of the decoder
    ``hidden @ weight.T + bias``, so the decoder weight stays tied to the model's embeddings."""

    def __init__(self, ignore_index: int = -100, chunk_size: Optional[int] = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size

    def forward(self, hidden, weight, bias, labels):
        """Mean CE over the rows whose label != ignore_index; see :func:`mlm_loss`."""
        return mlm_loss(hidden, weight, bias, labels, self.ignore_index, self.chunk_size)

    def extra_repr(self) -> str:
        """Shown by print(module)."""
        return f"ignore_index={self.ignore_index}, chunk_size={self.chunk_size}"
