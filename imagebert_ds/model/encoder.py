"""BERT-style post-LN Transformer encoder (Devlin et al. 2019 §3; ImageBERT §3.1 uses BERT-base).

HF's module names (``attention.self``, ``attention.output``, ``intermediate``, ``output``), so a
BERT checkpoint loads 1:1 and reproduces its outputs. ``fused_ops``: each LN(x + residual) is
``kernels.modules.FusedAddLayerNorm``. ``gradient_checkpointing`` recomputes layers in backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from imagebert_ds.kernels import pad_input, unpad_input
from imagebert_ds.kernels.modules import FusedAddLayerNorm

from .attention import SelfAttention, check_backend
from .backends import check_launchable, require_triton
from .config import ImageBERTConfig


def activation(name: str):
    """The activation function called ``name`` in a BERT config (``hidden_act``)."""
    if name == "gelu":
        return F.gelu  # erf GELU, BERT's
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"hidden_act {name!r} unsupported (gelu, gelu_new, gelu_pytorch_tanh, relu)")


class AddLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` of ``x + residual``: the torch twin of ``FusedAddLayerNorm`` (same call,
    same parameters)."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """LN(x + residual) (residual None: LN(x))."""
        return super().forward(x if residual is None else x + residual)


class _AddLayerNorm(nn.Module):
    """Post-LN sub-block tail: LN(dropout(dense(h)) + residual); the LayerNorm is
    ``FusedAddLayerNorm`` (add + LayerNorm as one Triton kernel) when ``fused_ops``, else
    ``AddLayerNorm`` (HF ``BertSelfOutput`` / ``BertOutput`` names)."""

    def __init__(self, d_in: int, c: ImageBERTConfig):
        super().__init__()
        if c.fused_ops:
            require_triton("fused_ops")
        self.dense = nn.Linear(d_in, c.hidden_size)
        norm = FusedAddLayerNorm if c.fused_ops else AddLayerNorm
        self.LayerNorm = norm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.fused = c.fused_ops

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """h (..., d_in) sub-block output, residual (..., H) -> (..., H)."""
        x = self.dropout(self.dense(h))
        if self.fused:
            check_launchable(x, "fused_ops")
        return self.LayerNorm(x, residual)


class SelfOutput(_AddLayerNorm):
    """Attention output: LN(dropout(W_o h) + x) (HF ``BertSelfOutput``)."""

    def __init__(self, c: ImageBERTConfig):
        super().__init__(c.hidden_size, c)


class Intermediate(nn.Module):
    """FFN first half: act(W_1 x), hidden -> intermediate (HF ``BertIntermediate``)."""

    def __init__(self, c: ImageBERTConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = activation(c.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., H) -> (..., intermediate_size)."""
        return self.act(self.dense(x))


class Output(_AddLayerNorm):
    """FFN second half: LN(dropout(W_2 h) + x), intermediate -> hidden (HF ``BertOutput``)."""

    def __init__(self, c: ImageBERTConfig):
        super().__init__(c.intermediate_size, c)


class Attention(nn.Module):
    """Self-attention plus its output block (HF ``BertAttention``)."""

    def __init__(self, c: ImageBERTConfig):
        super().__init__()
        self.self = SelfAttention(c.hidden_size, c.num_heads, c.attention_probs_dropout_prob, c.attn_impl)
        self.output = SelfOutput(c)

    def forward(self, x, key_padding_mask, varlen=None):
        """x (B, L, H) or packed (T, H) -> the same layout, after attention + output block."""
        return self.output(self.self(x, key_padding_mask, varlen), x)


class EncoderLayer(nn.Module):
    """One post-LN Transformer layer (HF ``BertLayer``)."""

    def __init__(self, c: ImageBERTConfig):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = Output(c)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                varlen: Optional[tuple] = None) -> torch.Tensor:
        """x (B, L, H) padded, or (T, H) packed real tokens when ``varlen`` = (cu_seqlens,
        max_seqlen): everything but attention is per token, so only attention needs to know."""
        x = self.attention(x, key_padding_mask, varlen)                  # (B, L, H) / (T, H)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    """The stack of ``num_layers`` encoder layers; unpadded (varlen) with attn_impl 'triton'."""

    def __init__(self, c: ImageBERTConfig):
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_layers))
        self.gradient_checkpointing = False

    @property
    def unpadded(self) -> bool:
        """True when the layers run on packed real tokens (attn_impl 'triton')."""
        return len(self.layer) > 0 and self.layer[0].attention.self.impl == "triton"

    def backend(self) -> str:
        """The attention path that runs, for logs: e.g. ``triton (unpadded varlen)``."""
        impl = self.layer[0].attention.self.impl if len(self.layer) else "none"
        return f"{impl} (unpadded varlen)" if impl == "triton" else f"{impl} (padded)"

    def set_attn_impl(self, impl: str) -> None:
        """Switch every layer's attention backend (e.g. for an equivalence test)."""
        check_backend(impl)
        for layer in self.layer:
            layer.attention.self.set_impl(impl)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, L, H); key_padding_mask (B, L) bool, True = real token -> (B, L, H).

        With attn_impl='triton' padding is dropped entirely: the real text + region tokens are
        packed once before the first layer (``unpad_input``: (T, H) plus ``cu_seqlens``), every
        layer runs on the packed tokens with varlen attention (dropout inside the kernel), and the
        result is re-padded after the last layer (padded positions come back as zeros).
        """
        varlen = None
        if self.unpadded:
            check_launchable(x, "attn_impl 'triton'")  # once here, for every layer's core
            if key_padding_mask is not None:
                B, L, _ = x.shape
                x, indices, cu_seqlens, max_seqlen = unpad_input(x, key_padding_mask)  # (T, H)
                varlen = (cu_seqlens, max_seqlen)
        for layer in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, key_padding_mask, varlen, use_reentrant=False)
            else:
                x = layer(x, key_padding_mask, varlen)
        if varlen is not None:
            x = pad_input(x, indices, B, L)                                       # (B, L, H)
        return x
