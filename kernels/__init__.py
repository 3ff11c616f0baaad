"""Triton kernels for imagebert_ds (installed as ``imagebert_ds.kernels``). See docs/kernels.md."""
from ._utils import HAS_TRITON, is_interpreting, triton_available, why_unavailable
from .attention import (
    AttentionFunction,
    TritonAttention,
    attention,
    attention_ref,
    attention_varlen,
    attention_varlen_ref,
    pad_input,
    unpad_input,
)
from .layernorm import AddLayerNormFunction, FusedAddLayerNorm, add_layernorm, add_layernorm_ref
from .mlm_loss import FusedLinearCrossEntropyFunction, FusedMLMLoss, mlm_loss, mlm_loss_ref

__all__ = [
    "HAS_TRITON", "triton_available", "why_unavailable", "is_interpreting",
    "attention", "attention_varlen", "attention_ref", "attention_varlen_ref", "unpad_input", "pad_input",
    "AttentionFunction", "TritonAttention",
    "add_layernorm", "add_layernorm_ref", "AddLayerNormFunction", "FusedAddLayerNorm",
    "mlm_loss", "mlm_loss_ref", "FusedLinearCrossEntropyFunction", "FusedMLMLoss",
]
