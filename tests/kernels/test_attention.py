"""Triton flash attention (imagebert_ds/kernels/flash_attention.py) vs a float64 torch reference (float32 for bf16).

Without a GPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set in conftest before
anything imports triton) at small, awkward shapes; with a GPU the same tests run on CUDA and the
``gpu``-marked tests add full model sizes (head dim 64, L = 512).
"""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from imagebert_ds.kernels.flash_attention import (
    attention,
    attention_dropout_mask,
    attention_ref,
    attention_varlen,
    attention_varlen_ref,
    pad_input,
    unpad_input,
)
from imagebert_ds.kernels.modules import TritonAttention

from kernel_checks import DEVICE, DTYPES, REF_DTYPE, assert_rel_close, requires_cuda, requires_triton

pytestmark = requires_triton

# Max error allowed, relative to the largest |reference| value of the tensor compared:
#  fp32: the kernel's fp32 math vs float64; observed <= 4e-6 (interpreter, numpy fp32 matmuls).
#  fp16: P and dS are rounded to fp16 (unit roundoff 2^-11 ~ 4.9e-4) before the second matmul of
#        each pair and inputs are fp16; observed <= 7e-4 relative (15 shape/seed draws).
#  bf16: same with 2^-8 mantissa (roundoff ~3.9e-3); observed <= 1e-2 relative; reference fp32.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(actual, ref, dtype, what):
    assert_rel_close(actual, ref, TOL[dtype], f"{what} ({dtype})", floor=0.1)


def make_mask(B, L, gen):
    """Random keep-mask (True = real token) with the hard cases: one all-padded row, one row with a
    single real key, (B > 2) a right-padded row whose padding spans whole key blocks (the kernels
    skip those blocks), (B > 3) a row without padding; other rows are not prefixes."""
    mask = torch.rand(B, L, generator=gen) > 0.35
    mask[0] = False  # fully padded: output and grads must be exactly 0, no NaN
    if B > 1:
        mask[1] = False
        mask[1, L - 1] = True  # only the last key
    if B > 2:
        mask[2] = True
        mask[2, max(1, L // 3):] = False
    if B > 3:
        mask[3] = True
    return mask


def qkv(shape, dtype, gen, device=DEVICE):
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_() for _ in range(3)]


def check_against_ref(fn, ref_fn, q, k, v, dtype, **kw):
    out = fn(q, k, v, **kw)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    rd = REF_DTYPE[dtype]
    qr, kr, vr = (t.detach().to(rd).requires_grad_() for t in (q, k, v))
    out_ref = ref_fn(qr, kr, vr, **kw)
    dq_r, dk_r, dv_r = torch.autograd.grad(out_ref, (qr, kr, vr), dout.to(rd))
    assert out.dtype == q.dtype and out.shape == q.shape
    for name, a, r in (("out", out, out_ref), ("dq", dq, dq_r), ("dk", dk, dk_r), ("dv", dv, dv_r)):
        assert_close(a, r, dtype, name)
    return out, (dq, dk, dv)


# (B, H, L, D): length 1, primes (17, 31, 37), 2^k + 1 (33), 2^k - 1 (15); every head dim
PADDED_SHAPES = [(2, 2, 1, 32), (3, 2, 17, 64), (3, 1, 33, 128), (4, 2, 15, 32), (3, 1, 37, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PADDED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_padded_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape) * 10 + DTYPES.index(dtype))
    B, H, L, D = shape
    q, k, v = qkv(shape, dtype, gen)
    mask = make_mask(B, L, gen).to(DEVICE)
    out, (dq, dk, dv) = check_against_ref(attention, attention_ref, q, k, v, dtype, key_padding_mask=mask)
    # the all-padded row is exactly zero, and so are the grads it receives / sends
    assert (out[0] == 0).all() and (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    # padding keys get no gradient
    assert (dk.transpose(1, 2)[~mask] == 0).all() and (dv.transpose(1, 2)[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_without_mask_and_custom_scale(dtype):
    gen = torch.Generator().manual_seed(1)
    q, k, v = qkv((2, 3, 19, 16), dtype, gen)
    check_against_ref(attention, attention_ref, q, k, v, dtype, softmax_scale=0.3)


def make_cu_seqlens(lens, device=DEVICE):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64])
def test_attention_varlen_matches_reference(D, dtype):
    # ragged: length 1, an empty sequence, a prime, 2^k + 1, a length that fills one block exactly
    lens = [1, 17, 0, 33, 16, 5]
    gen = torch.Generator().manual_seed(7 + D)
    cu = make_cu_seqlens(lens)
    q, k, v = qkv((sum(lens), 2, D), dtype, gen)
    check_against_ref(attention_varlen, attention_varlen_ref, q, k, v, dtype, cu_seqlens=cu,
                      max_seqlen=max(lens))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_padded_and_varlen_forms_agree(dtype):
    """unpad -> attention_varlen -> pad equals the padded form with a key mask at every real row
    (outputs and gradients), including a non-prefix mask and an all-padded sequence."""
    B, L, H, D = 4, 23, 2, 32
    gen = torch.Generator().manual_seed(3)
    mask = make_mask(B, L, gen).to(DEVICE)
    x = [torch.randn(B, L, H, D, generator=gen).to(DEVICE, dtype).requires_grad_() for _ in range(3)]
    dout = torch.randn(B, L, H, D, generator=gen).to(DEVICE, dtype) * mask[:, :, None, None]

    out_pad = attention(*(t.transpose(1, 2) for t in x), key_padding_mask=mask).transpose(1, 2)
    g_pad = torch.autograd.grad(out_pad, x, dout)

    packed = [unpad_input(t, mask) for t in x]
    _, indices, cu, max_len = packed[0]
    out_var = attention_varlen(*(p[0] for p in packed), cu, max_len)
    out_var = pad_input(out_var, indices, B, L)
    g_var = torch.autograd.grad(out_var, x, dout)

    keep = mask[:, :, None, None]
    # both are the same kernel arithmetic on the same rows and blocks up to block alignment, so
    # they agree far inside the reference tolerance; use it anyway (block splits differ).
    assert_close(out_var * keep, (out_pad * keep).float(), dtype, "out")
    for name, a, b in zip(("dq", "dk", "dv"), g_var, g_pad):
        assert_close(a, b.float(), dtype, name)


def test_unpad_pad_roundtrip_and_grads():
    gen = torch.Generator().manual_seed(0)
    B, L = 3, 9
    mask = torch.rand(B, L, generator=gen) > 0.5
    mask[0] = False
    mask[1] = True
    h = torch.randn(B, L, 5, generator=gen, requires_grad=True)
    packed, idx, cu, max_len = unpad_input(h, mask.long())  # 0/1 integer masks work too
    assert packed.shape == (int(mask.sum()), 5)
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + mask.sum(1).cumsum(0).tolist()
    assert max_len == int(mask.sum(1).max())
    back = pad_input(packed, idx, B, L)
    assert torch.equal(back, h.detach() * mask[..., None])
    back.sum().backward()
    assert torch.equal(h.grad, mask[..., None].float().expand_as(h))


def test_strided_views_need_no_copy():
    """q/k/v sliced out of a fused qkv projection (B, L, 3, H, D) and transposed to (B, H, L, D)."""
    gen = torch.Generator().manual_seed(5)
    B, L, H, D = 2, 21, 2, 32
    qkv_ = torch.randn(B, L, 3, H, D, generator=gen).to(DEVICE).requires_grad_()
    mask = make_mask(B, L, gen).to(DEVICE)
    q, k, v = (qkv_[:, :, i].transpose(1, 2) for i in range(3))
    out = attention(q, k, v, key_padding_mask=mask)
    assert out.transpose(1, 2).is_contiguous()  # (B, L, H, D) memory: merging heads is a free view
    out.sum().backward()
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out_c = attention(qc, kc, vc, key_padding_mask=mask)
    out_c.sum().backward()
    assert torch.allclose(out, out_c, atol=1e-6)
    assert torch.allclose(qkv_.grad[:, :, 0].transpose(1, 2), qc.grad, atol=1e-6)
    assert torch.allclose(qkv_.grad[:, :, 2].transpose(1, 2), vc.grad, atol=1e-6)


def test_non_unit_stride_head_dim_is_handled():
    """A q whose head dim is not the contiguous axis is copied once, for forward and backward."""
    gen = torch.Generator().manual_seed(15)
    base = torch.randn(2, 2, 16, 13, generator=gen).to(DEVICE).requires_grad_()  # (B, H, D, L)
    q = base.transpose(-1, -2)  # (B, H, L, D) with stride(-1) == L
    k, v = (torch.randn(2, 2, 13, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    check_against_ref(attention, attention_ref, q, k, v, torch.float32)


def test_module_dispatches_both_forms():
    gen = torch.Generator().manual_seed(2)
    m = TritonAttention()
    q, k, v = qkv((1, 2, 5, 16), torch.float32, gen)
    assert torch.allclose(m(q, k, v), attention(q, k, v))
    lens = [2, 3]
    qv, kv, vv = (t[0].transpose(0, 1).detach() for t in (q, k, v))
    out = m(qv, kv, vv, cu_seqlens=make_cu_seqlens(lens), max_seqlen=3)
    assert out.shape == qv.shape
    with pytest.raises(ValueError, match="not both"):
        m(qv, kv, vv, key_padding_mask=torch.ones(1, 5, dtype=torch.bool), cu_seqlens=make_cu_seqlens(lens))


def test_clear_errors():
    x = torch.randn(1, 1, 4, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 48 unsupported"):
        attention(x, x, x)
    y = torch.randn(1, 1, 4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(y, y.half(), y)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        attention(y, y, y, key_padding_mask=torch.ones(1, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="total_tokens"):
        attention_varlen(y, y, y, make_cu_seqlens([4]), 4)
    z = torch.zeros(65536, 1, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="CUDA grid limit"):
        attention(z, z, z)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [32, 64, 128])
def test_attention_full_size_gpu(D, dtype):
    gen = torch.Generator().manual_seed(11)
    B, H, L = 8, 12, 512
    q, k, v = qkv((B, H, L, D), dtype, gen)
    mask = make_mask(B, L, gen).cuda()
    check_against_ref(attention, attention_ref, q, k, v, dtype, key_padding_mask=mask)
    lens = [140, 1, 0, 511, 257, 97, 128, 33]
    qv, kv, vv = qkv((sum(lens), H, D), dtype, gen)
    check_against_ref(attention_varlen, attention_varlen_ref, qv, kv, vv, dtype,
                      cu_seqlens=make_cu_seqlens(lens), max_seqlen=max(lens))


def test_autocast_region_computes_in_autocast_dtype():
    """fp32 q/k/v inside autocast(bf16) run the bf16 kernel, like SDPA; grads come back in fp32."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = qkv((2, 2, 19, 32), torch.float32, gen)
    mask = make_mask(2, 19, gen).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = attention(q, k, v, key_padding_mask=mask)
    assert out.dtype == torch.bfloat16
    dq, = torch.autograd.grad(out.float().sum(), (q,))
    assert dq.dtype == torch.float32
    ref = attention_ref(*(t.detach().bfloat16().float() for t in (q, k, v)), key_padding_mask=mask)
    assert_close(out, ref, torch.bfloat16, "out")


# ----------------------------------------------------------------------------------------------
# Attention dropout: the kernels' Philox keep-mask vs the reference with the same mask
# ----------------------------------------------------------------------------------------------
def check_dropout_against_ref(fn, ref_fn, q, k, v, dtype, mask, p, seed, **kw):
    """Kernel with (p, seed) vs the reference with the keep-mask ``mask`` (forward and the three
    gradients). Returns the kernel's (out, grads) and the upstream gradient used."""
    out = fn(q, k, v, dropout_p=p, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed)  # the upstream gradient too: no global-RNG order dependence
    dout = torch.randn(out.shape, generator=g).to(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    rd = REF_DTYPE[dtype]
    qr, kr, vr = (t.detach().to(rd).requires_grad_() for t in (q, k, v))
    out_ref = ref_fn(qr, kr, vr, dropout_p=p, dropout_mask=mask, **kw)
    grads_ref = torch.autograd.grad(out_ref, (qr, kr, vr), dout.to(rd))
    # floor 1.0: the inputs are O(1), and with 1/(1-p)-scaled, partly dropped terms a gradient can
    # cancel to ~0.05 while still carrying the rounding of its O(1) terms (seen: 2.9e-6 absolute
    # in fp32 at D = 128, i.e. 6e-5 of such a small maximum)
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_ref, *grads_ref)):
        assert_rel_close(a, r, TOL[dtype], f"dropout {name} ({dtype})", floor=1.0)
    return out, grads, dout


# (B, H, L, D, dtype): length 1, a prime over several blocks, 2^k + 1 with D = 128, and one bf16
DROPOUT_PADDED = [(2, 2, 1, 32, torch.float32), (3, 2, 37, 16, torch.float32),
                  (2, 1, 33, 128, torch.float32), (3, 2, 23, 64, torch.bfloat16)]


@pytest.mark.parametrize("case", DROPOUT_PADDED, ids=lambda c: "x".join(map(str, c[:4])) + f"-{c[4]}")
def test_dropout_padded_matches_reference_with_the_kernels_mask(case):
    B, H, L, D, dtype = case
    gen = torch.Generator().manual_seed(100 + L)
    q, k, v = qkv((B, H, L, D), dtype, gen)
    kpm = make_mask(B, L, gen).to(DEVICE)
    p, seed = 0.3, 1234 + L
    keep = attention_dropout_mask(seed, B, H, L, L, p, device=DEVICE)
    out, (dq, dk, dv), _ = check_dropout_against_ref(attention, attention_ref, q, k, v, dtype, keep, p, seed,
                                                      key_padding_mask=kpm)
    # the all-padded row stays exactly zero, with zero gradients, under dropout too
    assert (out[0] == 0).all() and (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropout_varlen_matches_reference_with_the_kernels_mask(dtype):
    lens = [1, 17, 0, 33, 5]  # length 1, an empty sequence, a prime, 2^k + 1
    gen = torch.Generator().manual_seed(41)
    q, k, v = qkv((sum(lens), 2, 32), dtype, gen)
    p, seed, max_len = 0.2, 77, max(lens)
    keep = attention_dropout_mask(seed, len(lens), 2, max_len, max_len, p, device=DEVICE)
    check_dropout_against_ref(attention_varlen, attention_varlen_ref, q, k, v, dtype, keep, p, seed,
                              cu_seqlens=make_cu_seqlens(lens), max_seqlen=max_len)


def test_dropout_backward_fails_against_another_mask():
    """The check above can fail: the same kernel run compared with a reference that uses the mask
    of another seed disagrees in the output and in every gradient (a backward that regenerated a
    different mask than its forward would fail the matching test the same way)."""
    gen = torch.Generator().manual_seed(9)
    B, H, L, D = 2, 2, 19, 32
    q, k, v = qkv((B, H, L, D), torch.float32, gen)
    out = attention(q, k, v, dropout_p=0.3, seed=5)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    wrong = attention_dropout_mask(6, B, H, L, L, 0.3, device=DEVICE)
    out_ref = attention_ref(qr, kr, vr, dropout_p=0.3, dropout_mask=wrong)
    grads_ref = torch.autograd.grad(out_ref, (qr, kr, vr), dout.double())
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_ref, *grads_ref)):
        with pytest.raises(AssertionError):
            assert_close(a, r, torch.float32, name)


def _uniform_identity_inputs(B, H, L, D):
    """q = k = 0 (every kept key gets probability 1/L) and v = the identity on the key axis, so
    out[..., i, j] = keep[i, j] / (L * (1 - p)) for j < L: the kernel's own mask, read back."""
    q = torch.zeros(B, H, L, D, device=DEVICE)
    v = torch.eye(L, D, device=DEVICE).expand(B, H, L, D).contiguous()
    return q, q.clone(), v


def test_dropout_kernel_mask_is_attention_dropout_mask_and_drops_p():
    B, H, L, D, p, seed = 2, 3, 29, 32, 0.25, 2024
    q, k, v = _uniform_identity_inputs(B, H, L, D)
    out = attention(q, k, v, dropout_p=p, seed=seed)
    kept_in_kernel = out[..., :L] * (L * (1 - p)) > 0.5  # values are 0 or 1 (up to rounding)
    keep = attention_dropout_mask(seed, B, H, L, L, p, device=DEVICE)
    assert keep.dtype == torch.bool and keep.shape == (B, H, L, L)
    assert torch.equal(kept_in_kernel, keep)
    assert torch.allclose(out[..., :L] * (L * (1 - p)), keep.float(), atol=1e-5)
    # empirical drop fraction: n = 5046 Bernoulli(p) draws, std ~ 0.006; 0.03 is 5 sigma
    assert abs((~keep).float().mean().item() - p) < 0.03
    # a larger mask at another p (n = 28880, std ~ 0.003)
    keep = attention_dropout_mask(7, 4, 5, 38, 38, 0.6, device=DEVICE)
    assert abs((~keep).float().mean().item() - 0.6) < 0.015
    # and no two (batch, head) slices share a mask
    flat = keep.flatten(0, 1)
    assert all(not torch.equal(flat[0], flat[i]) for i in range(1, flat.shape[0]))


def test_dropout_varlen_mask_is_the_padded_equivalent_corner():
    """varlen sequence b's keep-mask is attention_dropout_mask(..., max_seqlen, max_seqlen)[b,
    :, :len, :len]: the counter uses positions within the sequence, not packed token indices."""
    lens, H, D, p, seed = [5, 21, 0, 13], 2, 32, 0.4, 31337
    max_len = max(lens)
    T = sum(lens)
    pos = torch.cat([torch.arange(n) for n in lens])  # position of each packed token in its sequence
    v = torch.nn.functional.one_hot(pos, D).float()[:, None, :].expand(T, H, D).contiguous().to(DEVICE)
    q = torch.zeros(T, H, D, device=DEVICE)
    out = attention_varlen(q, q.clone(), v, make_cu_seqlens(lens), max_len, dropout_p=p, seed=seed)
    keep = attention_dropout_mask(seed, len(lens), H, max_len, max_len, p, device=DEVICE)
    start = 0
    for b, n in enumerate(lens):
        got = out[start:start + n, :, :n].transpose(0, 1) * (n * (1 - p)) > 0.5  # (H, n, n)
        assert torch.equal(got, keep[b, :, :n, :n]), f"sequence {b}"
        start += n


def test_dropout_seed_semantics():
    gen = torch.Generator().manual_seed(21)
    q, k, v = (t.detach() for t in qkv((2, 2, 17, 16), torch.float32, gen))
    a = attention(q, k, v, dropout_p=0.5, seed=3)
    assert torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=3))  # same seed: identical
    assert not torch.allclose(a, attention(q, k, v, dropout_p=0.5, seed=4))  # another seed: not
    # no seed: drawn from torch's default CPU generator, so torch.manual_seed reproduces it ...
    torch.manual_seed(123)
    b1, b2 = attention(q, k, v, dropout_p=0.5), attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(123)
    assert torch.equal(b1, attention(q, k, v, dropout_p=0.5))
    assert not torch.allclose(b1, b2)  # ... and each call draws a fresh one
    # dropout_p = 0 is the no-dropout path: bit-identical, consumes no random numbers, ignores seed
    state = torch.get_rng_state()
    assert torch.equal(attention(q, k, v, dropout_p=0.0, seed=9), attention(q, k, v))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("preserve", [True, False])
def test_dropout_under_activation_checkpointing(preserve):
    """torch.utils.checkpoint recomputes the forward in the backward; with preserve_rng_state (the
    default) the recomputation draws the same seed from the restored CPU generator, so gradients
    equal the un-checkpointed ones. Without it they differ (the recomputed O belongs to another
    mask): the check can fail."""
    gen = torch.Generator().manual_seed(22)
    q, k, v = qkv((1, 2, 19, 16), torch.float32, gen)
    dout = torch.randn(1, 2, 19, 16, generator=gen).to(DEVICE)
    fn = lambda a, b, c: attention(a, b, c, dropout_p=0.3)  # noqa: E731
    torch.manual_seed(5)
    plain = torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    torch.manual_seed(5)
    out = checkpoint(fn, q, k, v, use_reentrant=False, preserve_rng_state=preserve)
    ckpt = torch.autograd.grad(out, (q, k, v), dout)
    same = all(torch.equal(a, b) for a, b in zip(plain, ckpt))
    assert same == preserve


def test_module_dropout_only_in_training():
    gen = torch.Generator().manual_seed(23)
    q, k, v = (t.detach() for t in qkv((1, 2, 9, 16), torch.float32, gen))
    m = TritonAttention(dropout_p=0.5)
    torch.manual_seed(1)
    train = m(q, k, v)
    torch.manual_seed(1)
    assert torch.equal(train, attention(q, k, v, dropout_p=0.5))
    assert torch.equal(m.eval()(q, k, v), attention(q, k, v))


def test_dropout_clear_errors():
    x = torch.randn(1, 1, 4, 32, device=DEVICE)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            attention(x, x, x, dropout_p=bad)
    for bad in (-1, 2**31, 1.5):
        with pytest.raises(ValueError, match="seed must be"):
            attention(x, x, x, dropout_p=0.1, seed=bad)
    with pytest.raises(ValueError, match="needs the dropout_mask"):
        attention_ref(x, x, x, dropout_p=0.1)
    with pytest.raises(TypeError):  # softmax_scale / dropout_p are keyword-only: no silent swap
        attention(x, x, x, None, 0.125)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attention_dropout_full_size_gpu(dtype):
    gen = torch.Generator().manual_seed(13)
    B, H, L, D, p = 8, 12, 512, 64, 0.1  # the model's shape and the shipped dropout
    q, k, v = qkv((B, H, L, D), dtype, gen)
    kpm = make_mask(B, L, gen).cuda()
    keep = attention_dropout_mask(99, B, H, L, L, p, device="cuda")
    check_dropout_against_ref(attention, attention_ref, q, k, v, dtype, keep, p, 99, key_padding_mask=kpm)
    lens = [140, 1, 0, 511, 257, 97, 128, 33]
    qv, kv, vv = qkv((sum(lens), H, D), dtype, gen)
    keep = attention_dropout_mask(98, len(lens), H, max(lens), max(lens), p, device="cuda")
    check_dropout_against_ref(attention_varlen, attention_varlen_ref, qv, kv, vv, dtype, keep, p, 98,
                              cu_seqlens=make_cu_seqlens(lens), max_seqlen=max(lens))
