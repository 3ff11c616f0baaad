"""Triton kernels for imagebert_ds. See docs/kernels.md.

Ops, one file per op (``@triton.jit`` kernels, launchers, autograd Function, functional entry
point, ``*_ref`` torch reference): ``flash_attention`` (attention, attention_varlen, dropout mask,
capability table), ``layernorm`` (add_layernorm), ``fused_linear_cross_entropy`` (mlm_loss).
Modules over them, the ones the model uses: ``modules`` (TritonAttention, FusedAddLayerNorm,
FusedMLMLoss). Importing this package never imports triton (see ``_utils``).
"""
from ._utils import HAS_TRITON, is_interpreting, triton_available, why_unavailable
from .flash_attention import (
    ATTENTION_DTYPES,
    ATTENTION_HEAD_DIMS,
    AttentionFunction,
    attention,
    attention_dropout_mask,
    attention_ref,
    attention_unsupported,
    attention_varlen,
    attention_varlen_ref,
    pad_input,
    unpad_input,
)
from .fused_linear_cross_entropy import FusedLinearCrossEntropyFunction, mlm_loss, mlm_loss_ref
from .layernorm import AddLayerNormFunction, add_layernorm, add_layernorm_ref
from .modules import FusedAddLayerNorm, FusedMLMLoss, TritonAttention

__all__ = [
    "HAS_TRITON", "triton_available", "why_unavailable", "is_interpreting",
    "attention", "attention_varlen", "attention_ref", "attention_varlen_ref", "unpad_input", "pad_input",
    "attention_dropout_mask", "AttentionFunction", "TritonAttention",
    "ATTENTION_HEAD_DIMS", "ATTENTION_DTYPES", "attention_unsupported",
    "add_layernorm", "add_layernorm_ref", "AddLayerNormFunction", "FusedAddLayerNorm",
    "mlm_loss", "mlm_loss_ref", "FusedLinearCrossEntropyFunction", "FusedMLMLoss",
]
