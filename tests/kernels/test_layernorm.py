"""Fused residual-add + LayerNorm (imagebert_ds/kernels/layernorm.py) vs a float64 torch reference (float32 for
bf16), forward and the gradients of x, residual, weight and bias. Interpreter on the CPU
(TRITON_INTERPRET=1, set before anything imports triton), CUDA when present."""
import pytest
import torch
from torch import nn

from imagebert_ds.kernels.layernorm import add_layernorm, add_layernorm_ref
from imagebert_ds.kernels.modules import FusedAddLayerNorm

from kernel_checks import DEVICE, DTYPES, REF_DTYPE, assert_rel_close, requires_cuda, requires_triton

pytestmark = requires_triton

# Max error relative to the largest |reference| value of each tensor:
#  fp32: fp32 statistics vs float64; observed <= 2e-7 (15 shape/seed draws).
#  fp16: inputs, y and the input gradients are rounded to fp16 (roundoff 2^-11 ~ 4.9e-4); dw/db
#        are fp32 sums of products of fp16-rounded values; observed <= 5e-4.
#  bf16: the same at 2^-8 (~3.9e-3); observed <= 6.3e-3; reference in fp32.
TOL = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual, ref, dtype, what):
    assert_rel_close(actual, ref, TOL[dtype], f"{what} ({dtype})", floor=0.1)


def run_case(shape, dtype, with_residual, gen, param_dtype=None, eps=1e-12, device=DEVICE):
    param_dtype = param_dtype or dtype
    C = shape[-1]
    # offset + scale so mean/variance matter; weight/bias random so their grads are non-trivial
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype).requires_grad_()
    r = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() if with_residual else None
    w = (1 + 0.3 * torch.randn(C, generator=gen)).to(device, param_dtype).requires_grad_()
    b = (0.3 * torch.randn(C, generator=gen)).to(device, param_dtype).requires_grad_()
    inputs = [t for t in (x, r, w, b) if t is not None]

    y = add_layernorm(x, r, w, b, eps)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    grads = torch.autograd.grad(y, inputs, dy)

    rd = REF_DTYPE[dtype]
    ref_inputs = [t.detach().to(rd).requires_grad_() for t in inputs]
    xr, rr = ref_inputs[0], (ref_inputs[1] if with_residual else None)
    wr, br = ref_inputs[-2], ref_inputs[-1]
    y_ref = add_layernorm_ref(xr, rr, wr, br, eps)
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, dy.to(rd))

    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype, "y")
    names = ["dx", "dresidual", "dweight", "dbias"] if with_residual else ["dx", "dweight", "dbias"]
    for name, g, g_ref, t in zip(names, grads, grads_ref, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close(g, g_ref, dtype, name)


# (rows..., C): 1 row; primes; 2^k +- 1 rows; C = BERT's 768, a non-power-of-two 129, tiny 17
SHAPES = [(1, 768), (7, 129), (33, 17), (2, 31, 768), (63, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_layernorm_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape) + DTYPES.index(dtype))
    run_case(shape, dtype, with_residual=True, gen=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plain_layernorm_without_residual(dtype):
    run_case((5, 100), dtype, with_residual=False, gen=torch.Generator().manual_seed(1), eps=1e-5)


def test_mixed_dtypes_fp32_params_bf16_activations():
    """Under autocast the LayerNorm parameters stay fp32 while activations are bf16."""
    run_case((9, 96), torch.bfloat16, with_residual=True, gen=torch.Generator().manual_seed(2),
             param_dtype=torch.float32)


def test_constant_row_is_finite():
    """A row with zero variance: rstd = 1/sqrt(eps) stays finite, xhat = 0, y = bias."""
    x = torch.full((2, 64), 3.0, device=DEVICE, requires_grad=True)
    w = torch.ones(64, device=DEVICE, requires_grad=True)
    b = torch.arange(64.0, device=DEVICE).requires_grad_()
    y = add_layernorm(x, torch.zeros_like(x), w, b, 1e-12)
    assert torch.equal(y, b.detach().expand(2, 64))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_module_is_a_layernorm_drop_in():
    gen = torch.Generator().manual_seed(3)
    ref = nn.LayerNorm(48, eps=1e-12)
    with torch.no_grad():
        ref.weight.normal_(generator=gen)
        ref.bias.normal_(generator=gen)
    m = FusedAddLayerNorm(48).to(DEVICE)
    m.load_state_dict(ref.state_dict())  # same parameter names: HF LayerNorm keys load as-is
    x, r = torch.randn(2, 5, 48, generator=gen), torch.randn(2, 5, 48, generator=gen)
    assert torch.allclose(m(x.to(DEVICE), r.to(DEVICE)).cpu(), ref(x + r), atol=1e-5)


def test_too_wide_rows_raise():
    x = torch.randn(1, 65537, device=DEVICE)
    with pytest.raises(ValueError, match="exceeds the fused kernel's limit"):
        add_layernorm(x, None, torch.ones(65537, device=DEVICE), torch.zeros(65537, device=DEVICE))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_layernorm_full_size_gpu(dtype):
    run_case((32, 141, 768), dtype, with_residual=True, gen=torch.Generator().manual_seed(4))
