"""BERT-style post-LN Transformer encoder (Devlin et al. 2019 §3; ImageBERT §3.1 uses BERT-base).

One layer: x = LN(x + Drop(W_o Attn(x))); x = LN(x + Drop(W_2 act(W_1 x))) — the post-LN order of
BERT, so a pre-trained BERT's weights reproduce its outputs exactly. Parameter names follow HF's
``BertLayer`` (``attention.self.query`` ...) so checkpoint loading is a 1:1 name map.

``Encoder.gradient_checkpointing`` (toggled by the trainer via ``ImageBERTModel.
gradient_checkpointing_enable()``) recomputes each layer in the backward (torch.utils.checkpoint,
non-reentrant), trading ~1 extra forward for O(layers) less activation memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import SelfAttention, notice_once
from .config import ImageBERTConfig


def activation(name: str):
    if name == "gelu":
        return F.gelu  # erf GELU, BERT's
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"hidden_act {name!r} unsupported (gelu, gelu_new, gelu_pytorch_tanh, relu)")


def resolve_fused_ops(flag: bool) -> bool:
    """``fused_ops`` is reserved for fused LayerNorm/GELU kernels from imagebert_ds.kernels; none is
    wired in yet, so a True flag logs a notice once and the torch ops are used."""
    if flag:
        notice_once("fused_ops=True: no fused ops are wired into the model yet (reserved for "
                    "imagebert_ds.kernels); using torch LayerNorm/GELU")
    return False


class _AttnOutput(nn.Module):
    def __init__(self, c: ImageBERTConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)


class _Attention(nn.Module):
    def __init__(self, c: ImageBERTConfig):
        super().__init__()
        self.self = SelfAttention(c.hidden_size, c.num_heads, c.attention_probs_dropout_prob, c.attn_impl)
        self.output = _AttnOutput(c)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class EncoderLayer(nn.Module):
    def __init__(self, c: ImageBERTConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Dense(c.hidden_size, c.intermediate_size)
        self.output = _AttnOutput(c)  # dense: intermediate -> hidden, LayerNorm, dropout
        self.output.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = activation(c.hidden_act)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        a = self.attention.output
        h = self.attention.self(x, key_padding_mask)                      # (B, L, H)
        x = a.LayerNorm(x + a.dropout(a.dense(h)))
        o = self.output
        h = self.act(self.intermediate.dense(x))                          # (B, L, I)
        return o.LayerNorm(x + o.dropout(o.dense(h)))


class Encoder(nn.Module):
    def __init__(self, c: ImageBERTConfig):
        super().__init__()
        resolve_fused_ops(c.fused_ops)
        self.layer = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_layers))
        self.gradient_checkpointing = False

    def set_attn_impl(self, impl: str) -> None:
        for layer in self.layer:
            layer.attention.self.impl = impl

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, L, H); key_padding_mask (B, L) bool, True = real token -> (B, L, H)."""
        for layer in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, key_padding_mask, use_reentrant=False)
            else:
                x = layer(x, key_padding_mask)
        return x
