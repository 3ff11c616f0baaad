"""The package surface of ``imagebert_ds.kernels`` that needs no triton: module names, exports, the
attention capability table and argument validation. Runs everywhere (no interpreter, no GPU)."""
import subprocess
import sys
import types

import pytest
import torch

import imagebert_ds.kernels as K


def test_no_function_shadows_its_module():
    import imagebert_ds.kernels.flash_attention as fa
    import imagebert_ds.kernels.fused_linear_cross_entropy as lce
    import imagebert_ds.kernels.layernorm as ln
    import imagebert_ds.kernels.modules as mods

    for m in (fa, lce, ln, mods):
        assert isinstance(m, types.ModuleType), m
    # the package-level names are the ops' functions and the modules' classes
    assert K.attention is fa.attention and K.attention_varlen is fa.attention_varlen
    assert K.mlm_loss is lce.mlm_loss and K.add_layernorm is ln.add_layernorm
    assert (K.TritonAttention, K.FusedAddLayerNorm, K.FusedMLMLoss) == (
        mods.TritonAttention, mods.FusedAddLayerNorm, mods.FusedMLMLoss)
    for name in K.__all__:
        assert not isinstance(getattr(K, name), types.ModuleType), name


def test_capability_table():
    assert K.ATTENTION_HEAD_DIMS == (16, 32, 64, 128)
    assert set(K.ATTENTION_DTYPES) == {torch.float16, torch.bfloat16, torch.float32}
    for d in K.ATTENTION_HEAD_DIMS:
        for dt in K.ATTENTION_DTYPES:
            assert K.attention_unsupported(d, dt) is None
    assert K.attention_unsupported(64) is None
    reason = K.attention_unsupported(48)
    assert "head dim 48" in reason and "16, 32, 64, 128" in reason and "\n" not in reason
    assert "float64" in K.attention_unsupported(64, torch.float64)
    # the kernel's own input check uses the same table and wording
    x = torch.randn(1, 1, 4, 48)
    with pytest.raises(ValueError, match="head dim 48 unsupported"):
        K.attention(x, x, x)


def test_capability_table_and_validation_import_no_triton():
    code = ("import sys, torch, imagebert_ds.kernels as K; "
            "r = K.attention_unsupported(80, torch.bfloat16); x = torch.randn(1, 1, 3, 16)\n"
            "try:\n    K.attention(x, x, x, dropout_p=1.5)\nexcept ValueError as e:\n    msg = str(e)\n"
            "print('triton' in sys.modules, r is not None, msg)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False True attention: dropout_p must be in [0, 1), got 1.5"
