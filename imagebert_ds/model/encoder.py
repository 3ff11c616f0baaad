"""BERT-style post-LN Transformer encoder (Devlin et al. 2019 §3; ImageBERT §3.1 uses BERT-base).

One layer: x = LN(x + Drop(W_o Attn(x))); x = LN(x + Drop(W_2 act(W_1 x))) — the post-LN order of
BERT, so a pre-trained BERT's weights reproduce its outputs exactly. With ``fused_ops`` each
``LN(x + residual)`` is one Triton kernel (``imagebert_ds.kernels.add_layernorm``) where it can run. Parameter names follow HF's
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

from .attention import SelfAttention, kernels_usable_on, notice_once, varlen_usable
from .config import ImageBERTConfig


def activation(name: str):
    if name == "gelu":
        return F.gelu  # erf GELU, BERT's
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"hidden_act {name!r} unsupported (gelu, gelu_new, gelu_pytorch_tanh, relu)")


def resolve_fused_ops(flag: bool, name: str = "add_layernorm"):
    """``fused_ops=True``: fetch kernel ``name`` from imagebert_ds.kernels — ``add_layernorm`` (the
    residual-add + LayerNorm of each post-LN sub-block) or ``mlm_loss`` (decoder + CE without
    materialising the logits). Returns the function, or None (torch ops) with a notice logged once
    when the kernels package cannot provide it."""
    if not flag:
        return None
    try:
        from imagebert_ds import kernels
        fn = getattr(kernels, name, None)
    except Exception as e:  # a broken kernels package must not break the model
        notice_once(f"fused_ops=True: importing imagebert_ds.kernels failed ({e}); using torch ops")
        return None
    if fn is None:
        notice_once(f"fused_ops=True: imagebert_ds.kernels exposes no {name}; using torch ops")
    return fn


def add_layernorm(ln: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor, fused) -> torch.Tensor:
    """LN(x + residual), through the fused kernel when enabled and launchable on x's device."""
    if fused is not None:
        if kernels_usable_on(x):
            return fused(x, residual, ln.weight, ln.bias, ln.eps)
        notice_once(f"fused_ops=True: Triton cannot run on {x.device} here (needs the `triton` "
                    f"package and CUDA, or TRITON_INTERPRET=1); using torch LayerNorm")
    return ln(x + residual)


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
        self.fused = resolve_fused_ops(c.fused_ops)  # add_layernorm kernel or None

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                varlen: Optional[tuple] = None) -> torch.Tensor:
        """x (B, L, H) padded, or (T, H) packed real tokens when ``varlen`` = (cu_seqlens,
        max_seqlen): everything but attention is per token, so only attention needs to know."""
        a = self.attention.output
        h = self.attention.self(x, key_padding_mask, varlen)              # (B, L, H) / (T, H)
        x = add_layernorm(a.LayerNorm, a.dropout(a.dense(h)), x, self.fused)
        o = self.output
        h = self.act(self.intermediate.dense(x))                          # (B, L, I)
        return add_layernorm(o.LayerNorm, o.dropout(o.dense(h)), x, self.fused)


class Encoder(nn.Module):
    def __init__(self, c: ImageBERTConfig):
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_layers))
        self.gradient_checkpointing = False

    def set_attn_impl(self, impl: str) -> None:
        for layer in self.layer:
            layer.attention.self.impl = impl

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, L, H); key_padding_mask (B, L) bool, True = real token -> (B, L, H).

        With attn_impl='triton' (and the kernels launchable here) padding is dropped entirely: the
        real text + region tokens are packed once before the first layer (``unpad_input``: (T, H)
        plus ``cu_seqlens``), every layer runs on the packed tokens with varlen attention, and the
        result is re-padded after the last layer (padded positions come back as zeros).
        """
        sa = self.layer[0].attention.self if len(self.layer) else None
        varlen = None
        if sa is not None and key_padding_mask is not None and varlen_usable(
                x, sa.impl, sa.head_dim, sa.dropout if self.training else 0.0):
            from imagebert_ds.kernels import pad_input, unpad_input
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
