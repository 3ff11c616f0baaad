"""The ``@triton.jit`` bodies of the flash attention in ``flash_attention.py`` (host side there).

FlashAttention-2 (Dao, 2023, arXiv:2307.08691, Alg. 1 forward / Alg. 2 backward), non-causal:

* ``_attn_fwd_kernel``: one program per (query block, sequence * head); keys/values streamed in
  blocks of BLOCK_N with an online softmax in fp32 (log2 domain, exp2). Writes O and the per-row
  log-sum-exp of the *undropped* softmax.
* ``_attn_bwd_preprocess_kernel``: delta_i = rowsum(dO * O) (Alg. 2 line 4).
* ``_attn_bwd_dkdv_kernel``: one program per key block, looping over query blocks.
* ``_attn_bwd_dq_kernel``: one program per query block, looping over key blocks.
  (Split so that no atomics are needed: the backward is deterministic.)
* ``_dropout_mask_kernel``: writes the keep-mask the three kernels above use, for tests.

Shared device helpers instead of a copied prologue (as flash-attention's ``layer_norm.py``):
``_seq_bounds`` (which rows belong to this program's sequence, padded or varlen) and
``_dropout_keep`` (the attention-dropout keep-mask of a tile).

Dropout (as flash-attention): P = softmax(S); O = (P * Z) V with Z = keep / (1 - p) and
keep = uniform >= p, the uniform drawn by Philox (``tl.rand``) keyed by a seed and a counter that
is a pure function of (sequence b, head h, query row i, key col j) *within the sequence*:

    counter = ((b * H + h) * max_seqlen + i) * max_seqlen + j        (int64)

so the backward regenerates the forward's mask exactly, whatever the block sizes. Backward with
dropout: dV = (P * Z)^T dO;  dP = (dO V^T) * Z;  dS = P * (dP - delta). delta = rowsum(dO * O) is
still rowsum(P * dP) because O already holds the dropout: sum_j P_ij dP_ij =
sum_j (P * Z)_ij (dO V^T)_ij = sum_d dO_id O_id.
"""
from __future__ import annotations

from ._utils import jit, tl


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@jit
def _seq_bounds(CU_SEQLENS, bh, n_heads, max_seqlen, VARLEN: tl.constexpr):
    """(b, h, seq_start, seqlen) of the (sequence, head) ``bh`` = b * n_heads + h: varlen rows
    cu_seqlens[b]:cu_seqlens[b+1] of the packed tensor, padded rows 0:max_seqlen of batch entry b."""
    b = bh // n_heads
    h = bh % n_heads
    if VARLEN:
        seq_start = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - seq_start
    else:
        seq_start = 0
        seqlen = max_seqlen
    return b, h, seq_start, seqlen


@jit
def _dropout_keep(seed, p_drop, bh, rows, cols, seqlen_q, seqlen_k):
    """Keep-mask (True = kept) of attention dropout at query ``rows`` x key ``cols`` of the
    (sequence, head) ``bh``: int index tiles within the sequence that broadcast to the tile
    shape (``rows[:, None], cols[None, :]``, or transposed for a (keys, queries) tile). The Philox
    counter ((bh * seqlen_q + row) * seqlen_k + col) is computed in int64 (no overflow limit)."""
    offs = (bh.to(tl.int64) * seqlen_q + rows) * seqlen_k + cols
    return tl.rand(seed, offs) >= p_drop


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@jit(do_not_specialize=("seed",))
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KMASK, KV_END, CU_SEQLENS,
    qk_scale,  # softmax_scale * log2(e)
    p_drop, seed,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_mb,
    n_heads, max_seqlen,  # padded: L; varlen: max_seqlen (the dropout counter's row/col stride)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_KMASK: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, seq_start, seqlen = _seq_bounds(CU_SEQLENS, bh, n_heads, max_seqlen, VARLEN)
    if start_m * BLOCK_M >= seqlen:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    kv_hi = seqlen
    if HAS_KMASK:  # keys after the last real one are skipped (right padding costs nothing)
        kv_hi = tl.minimum(seqlen, tl.load(KV_END + b))

    q_ptrs = Q + b * stride_qb + h * stride_qh + (seq_start + offs_m)[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh + seq_start * stride_kn
    v_base = V + b * stride_vb + h * stride_vh + seq_start * stride_vn

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, kv_hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen
        if HAS_KMASK:
            keep = tl.load(KMASK + b * stride_mb + cols, mask=col_ok, other=0)
            col_ok = col_ok & (keep != 0)
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :],
                    mask=(cols < seqlen)[:, None], other=0.0)  # (BLOCK_N, D)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no valid key so far has m_new = -inf; shift by 0 instead so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normalizer is the undropped softmax's
        acc = acc * alpha[:, None]
        if DROPOUT:  # dropped probabilities leave the numerator only; 1 / (1 - p) is applied at the end
            p = tl.where(_dropout_keep(seed, p_drop, bh, offs_m[:, None], cols[None, :], max_seqlen,
                                       max_seqlen), p, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=(cols < seqlen)[:, None], other=0.0)  # (BLOCK_N, D)
        p = p.to(V.dtype.element_ty)
        if UPCAST:
            v = v.to(tl.float32)
            p = p.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision="ieee")
        m_i = m_new

    empty = l_i == 0.0  # every key masked: output 0, lse = +inf so the backward's exp2 gives 0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - p_drop))
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    o_ptrs = O + b * stride_ob + h * stride_oh + (seq_start + offs_m)[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b * stride_lb + h * stride_lh + seq_start + offs_m, lse, mask=row_ok)


@jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, CU_SEQLENS,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    n_heads, max_seqlen,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id in fp32 (FA2 Alg. 2 line 4), laid out like the lse."""
    start_m = tl.program_id(0)
    b, h, seq_start, seqlen = _seq_bounds(CU_SEQLENS, tl.program_id(1), n_heads, max_seqlen, VARLEN)
    if start_m * BLOCK_M >= seqlen:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    rows = seq_start + offs_m
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + b * stride_lb + h * stride_lh + rows, tl.sum(o * do, axis=1), mask=row_ok)


@jit(do_not_specialize=("seed",))
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KMASK, KV_END, CU_SEQLENS,
    qk_scale, sm_scale, p_drop, seed,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh,
    stride_mb,
    n_heads, max_seqlen,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_KMASK: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, seq_start, seqlen = _seq_bounds(CU_SEQLENS, bh, n_heads, max_seqlen, VARLEN)
    if start_n * BLOCK_N >= seqlen:
        return

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_in = offs_n < seqlen
    col_ok = col_in
    m_hi = seqlen
    if HAS_KMASK:
        keep = tl.load(KMASK + b * stride_mb + offs_n, mask=col_in, other=0)
        col_ok = col_ok & (keep != 0)
        # a key block past the last real key has dK = dV = 0: skip the loop, still store the zeros
        m_hi = tl.where(start_n * BLOCK_N < tl.load(KV_END + b), seqlen, 0)

    k = tl.load(K + b * stride_kb + h * stride_kh + (seq_start + offs_n)[:, None] * stride_kn + offs_d[None, :],
                mask=col_in[:, None], other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + b * stride_vb + h * stride_vh + (seq_start + offs_n)[:, None] * stride_vn + offs_d[None, :],
                mask=col_in[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh + seq_start * stride_qm
    do_base = DO + b * stride_dob + h * stride_doh + seq_start * stride_dom
    l_base = LSE + b * stride_lb + h * stride_lh + seq_start
    d_base = DELTA + b * stride_lb + h * stride_lh + seq_start

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, m_hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        # out-of-range rows get lse = +inf so their probabilities are exactly 0
        lse = tl.load(l_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(d_base + rows, mask=row_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        sT = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(sT - lse[None, :])
        pT = tl.where(col_ok[:, None] & row_ok[None, :], pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision="ieee")  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        if DROPOUT:  # the forward's mask, transposed: keys are rows of this tile
            keepT = _dropout_keep(seed, p_drop, bh, rows[None, :], offs_n[:, None], max_seqlen, max_seqlen)
            inv_keep = 1.0 / (1.0 - p_drop)
            pT_used = tl.where(keepT, pT * inv_keep, 0.0)  # (P * Z)^T
            dpT = tl.where(keepT, dpT * inv_keep, 0.0)  # dP^T = (dO V^T)^T * Z^T
        else:
            pT_used = pT
        pT_lo = pT_used.to(DO.dtype.element_ty)
        if UPCAST:
            pT_lo = pT_lo.to(tl.float32)
        dv = tl.dot(pT_lo, do, dv, input_precision="ieee")
        dsT = pT * (dpT - delta[None, :])
        dsT_lo = dsT.to(Q.dtype.element_ty)
        if UPCAST:
            dsT_lo = dsT_lo.to(tl.float32)
        dk = tl.dot(dsT_lo, q, dk, input_precision="ieee")
    dk = dk * sm_scale

    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + (seq_start + offs_n)[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + (seq_start + offs_n)[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_in[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_in[:, None])


@jit(do_not_specialize=("seed",))
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KMASK, KV_END, CU_SEQLENS,
    qk_scale, sm_scale, p_drop, seed,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh,
    stride_mb,
    n_heads, max_seqlen,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_KMASK: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, seq_start, seqlen = _seq_bounds(CU_SEQLENS, bh, n_heads, max_seqlen, VARLEN)
    if start_m * BLOCK_M >= seqlen:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen

    q = tl.load(Q + b * stride_qb + h * stride_qh + (seq_start + offs_m)[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + (seq_start + offs_m)[:, None] * stride_dom + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + seq_start + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + b * stride_lb + h * stride_lh + seq_start + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh + seq_start * stride_kn
    v_base = V + b * stride_vb + h * stride_vh + seq_start * stride_vn
    kv_hi = seqlen
    if HAS_KMASK:
        kv_hi = tl.minimum(seqlen, tl.load(KV_END + b))

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, kv_hi, BLOCK_N):
        cols = start_n + offs_n
        col_in = cols < seqlen
        col_ok = col_in
        if HAS_KMASK:
            keep = tl.load(KMASK + b * stride_mb + cols, mask=col_in, other=0)
            col_ok = col_ok & (keep != 0)
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=col_in[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=col_in[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # dO V^T
        if DROPOUT:  # dP = (dO V^T) * Z with the forward's mask
            keep_d = _dropout_keep(seed, p_drop, bh, offs_m[:, None], cols[None, :], max_seqlen, max_seqlen)
            dp = tl.where(keep_d, dp * (1.0 / (1.0 - p_drop)), 0.0)
        ds = p * (dp - delta[:, None])
        ds_lo = ds.to(K.dtype.element_ty)
        if UPCAST:
            ds_lo = ds_lo.to(tl.float32)
        dq = tl.dot(ds_lo, k, dq, input_precision="ieee")
    dq = dq * sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + (seq_start + offs_m)[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@jit(do_not_specialize=("seed",))
def _dropout_mask_kernel(
    KEEP, p_drop, seed, seqlen_q, seqlen_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """KEEP (B*H, seqlen_q, seqlen_k) int8 contiguous <- the keep-mask of ``_dropout_keep``;
    grid (query blocks, B * H, key blocks)."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, p_drop, bh, rows[:, None], cols[None, :], seqlen_q, seqlen_k)
    ptrs = KEEP + (bh.to(tl.int64) * seqlen_q + rows[:, None]) * seqlen_k + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows < seqlen_q)[:, None] & (cols < seqlen_k)[None, :])
