"""Benchmark: Triton flash attention (padded + varlen) vs torch SDPA backends, forward / backward.

    python benchmarks/bench_attention.py            # GPU: full sizes; CPU: labelled smoke run
    python benchmarks/bench_attention.py --dtype fp16 --heads 12
    python benchmarks/bench_attention.py --dropout 0  # no attention dropout (default 0.1, as trained)

Batches are ImageBERT-shaped: each sample is text (10-40 tokens) + 100 image regions, right-padded
to L, so at L >= 256 over 30% of the padded batch is padding. Every method gets the same tokens:
  triton_padded        attention(q, k, v, key_padding_mask)          (B, H, L, D)
  triton_varlen        attention_varlen on the unpadded tokens        (T, H, D), no padding work
  sdpa_<backend>       SDPA under sdpa_kernel(<backend>) with the (B, 1, 1, L) boolean key mask;
                       a backend that rejects the mask is recorded as unsupported
  sdpa_flash_nomask    SDPA flash without a mask: NOT a correct result for padded batches, shown
                       only as the speed of light for dense attention at this L
Baseline for the targets = the fastest SDPA backend that gives the correct masked result.
Attention dropout (``--dropout``, default 0.1 = the shipped configs' attention_probs_dropout_prob)
is on for every method, so the comparison is the training one: Triton's in-kernel Philox dropout
vs SDPA's ``dropout_p``. The Triton rows are timed drawing a fresh seed per call, as in training;
their max_err is checked against the fp32 reference with the kernel's own keep-mask
(``attention_dropout_mask``). SDPA's dropout mask cannot be reproduced, so with dropout its
max_err is not reported.
TFLOP/s: ``tflops`` counts the work each method does (B*L^2 for padded, sum(len^2) for varlen);
``useful_tflops`` counts only real-token work (sum(len^2)) for all. fwd = 4*H*D*n^2 FLOPs,
bwd = 2.5 x fwd, fwd+bwd = 3.5 x fwd (the FlashAttention paper's convention).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets TRITON_INTERPRET on a CPU-only machine before triton loads)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from imagebert_ds.kernels import triton_available  # noqa: E402
from imagebert_ds.kernels.flash_attention import (  # noqa: E402
    attention,
    attention_dropout_mask,
    attention_ref,
    attention_varlen,
    attention_varlen_ref,
    unpad_input,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def imagebert_lengths(batch, seqlen, gen, text=(10, 40), regions=100):
    """Real lengths: text tokens in [text[0], text[1]] + ``regions``, clipped to seqlen."""
    t = torch.randint(text[0], text[1] + 1, (batch,), generator=gen)
    return (t + regions).clamp(max=seqlen, min=1)


def sdpa_fn(backend, mask, dropout_p):
    """Torch SDPA pinned to one backend (flash / efficient / math), with the same mask and dropout."""
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return run


def measure(name, fwd, inputs, dout, flops_done, flops_useful, rows_ok, ref_out, check=None):
    """Time fwd, bwd, fwd+bwd; peak memory of fwd+bwd; max error on real rows vs the fp32 reference
    of ``check(*inputs)`` (default ``fwd``: a deterministic run); no max_err when ref_out is None."""
    row = {"method": name}
    try:
        out = fwd(*inputs)
        if ref_out is not None:
            got = (check or fwd)(*inputs).detach().float()
            row["max_err"] = float(((got - ref_out) * rows_ok).abs().max())
        row["fwd_ms"] = common.bench_ms(lambda: fwd(*inputs))
        row["bwd_ms"] = common.bench_ms(
            lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))
        row["fwd_bwd_ms"] = common.bench_ms(lambda: torch.autograd.grad(fwd(*inputs), inputs, dout))
        del out
        row["peak_mem_mb"] = common.peak_memory_mb(lambda: torch.autograd.grad(fwd(*inputs), inputs, dout))
    except torch.cuda.OutOfMemoryError:
        row["unsupported"] = "out of memory"
        torch.cuda.empty_cache()
        return row
    except RuntimeError as e:  # e.g. an SDPA backend that rejects a boolean mask / this dtype
        if not name.startswith("sdpa"):
            raise  # a failure of our kernel is a bug, not a data point
        row["unsupported"] = str(e).splitlines()[0][:200]
        return row
    for key, mult in (("fwd", 1.0), ("bwd", 2.5), ("fwd_bwd", 3.5)):
        ms = row[f"{key}_ms"]
        row[f"{key}_tflops"] = mult * flops_done / (ms * 1e-3) / 1e12
        row[f"{key}_useful_tflops"] = mult * flops_useful / (ms * 1e-3) / 1e12
    return row


def run_one(L, B, H, D, dtype, gen, device, smoke, dropout_p=0.0):
    """Every method at one shape (B, H, L, D) and padding draw."""
    # smoke sizes scale the sample down (text 3-10 + 12 regions) so short L still has padding
    lens = imagebert_lengths(B, L, gen, **({"text": (3, 10), "regions": 12} if smoke else {}))
    mask = torch.arange(L)[None, :] < lens[:, None]  # (B, L) True = real token
    mask = mask.to(device)
    padding = 1.0 - lens.sum().item() / (B * L)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(B, H, L, D, generator=gen).to(device, dtype) * mask[:, None, :, None]
    rows_ok = mask[:, None, :, None].float()

    # fp32 reference on the real rows: math SDPA with the boolean mask, or with dropout the torch
    # reference with the keep-mask the kernel uses for SEED (its error check runs with that seed)
    seed, p = 1234, dropout_p
    if p > 0:
        keep = attention_dropout_mask(seed, B, H, L, L, p, device=device)
        with torch.no_grad():
            ref_out = attention_ref(q.float(), k.float(), v.float(), mask, dropout_p=p, dropout_mask=keep)
        del keep
    else:
        with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
            ref_out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                     attn_mask=mask[:, None, None, :])

    flops_dense = 4.0 * B * H * L * L * D
    flops_useful = 4.0 * H * D * float((lens.double() ** 2).sum())
    results = []
    results.append(measure("triton_padded", lambda a, b, c: attention(a, b, c, mask, dropout_p=p),
                           [q, k, v], dout, flops_dense, flops_useful, rows_ok, ref_out,
                           check=lambda a, b, c: attention(a, b, c, mask, dropout_p=p, seed=seed)))

    # varlen: the model unpads once before the first layer, so only the kernel is timed here
    to_tokens = lambda t: t.detach().transpose(1, 2)  # (B, L, H, D)  # noqa: E731
    qp, idx, cu, max_len = unpad_input(to_tokens(q), mask)
    kp, vp = unpad_input(to_tokens(k), mask)[0], unpad_input(to_tokens(v), mask)[0]
    qp, kp, vp = (t.contiguous().requires_grad_() for t in (qp, kp, vp))
    dout_p = unpad_input(dout.transpose(1, 2), mask)[0].contiguous()
    if p > 0:  # varlen masks are indexed by position within each sequence, strided by max_len
        keep = attention_dropout_mask(seed, B, H, max_len, max_len, p, device=device)
        with torch.no_grad():
            ref_p = attention_varlen_ref(qp.float(), kp.float(), vp.float(), cu, max_len, dropout_p=p,
                                         dropout_mask=keep)
        del keep
    else:
        ref_p = unpad_input(ref_out.transpose(1, 2), mask)[0]
    results.append(measure("triton_varlen", lambda a, b, c: attention_varlen(a, b, c, cu, max_len, dropout_p=p),
                           [qp, kp, vp], dout_p, flops_useful, flops_useful, 1.0, ref_p,
                           check=lambda a, b, c: attention_varlen(a, b, c, cu, max_len, dropout_p=p, seed=seed)))

    sdpa_mask = mask[:, None, None, :]  # (B, 1, 1, L) bool, True = take part in attention
    sdpa_ref = ref_out if p == 0 else None  # SDPA's dropout mask is not reproducible
    for bname, backend in SDPA_BACKENDS.items():
        results.append(measure(f"sdpa_{bname}", sdpa_fn(backend, sdpa_mask, p), [q, k, v], dout,
                               flops_dense, flops_useful, rows_ok, sdpa_ref))
    results.append(measure("sdpa_flash_nomask", sdpa_fn(SDPBackend.FLASH_ATTENTION, None, p), [q, k, v], dout,
                           flops_dense, flops_useful, rows_ok, sdpa_ref))
    for r in results:
        r.update(L=L, B=B, H=H, D=D, dtype=str(dtype).replace("torch.", ""), padding_frac=round(padding, 4),
                 mean_len=float(lens.float().mean()), dropout_p=p)
    return results


def summarize(results):
    """Per L: fwd+bwd speed-up of triton (padded, varlen) over the best correct SDPA backend."""
    summary = []
    for L in sorted({r["L"] for r in results}):
        rs = [r for r in results if r["L"] == L and "fwd_bwd_ms" in r]
        by = {r["method"]: r for r in rs}
        sdpa = [r for r in rs if r["method"].startswith("sdpa_") and r["method"] != "sdpa_flash_nomask"]
        if not sdpa or "triton_padded" not in by:
            continue
        best = min(sdpa, key=lambda r: r["fwd_bwd_ms"])
        pad = by["triton_padded"]["padding_frac"]
        s = {"L": L, "padding_frac": pad, "best_sdpa": best["method"], "best_sdpa_fwd_bwd_ms": best["fwd_bwd_ms"],
             "speedup_padded": best["fwd_bwd_ms"] / by["triton_padded"]["fwd_bwd_ms"],
             "speedup_varlen": best["fwd_bwd_ms"] / by["triton_varlen"]["fwd_bwd_ms"]}
        if common.HAS_CUDA:  # targets only mean something for compiled GPU kernels
            s["target_padded_ge_1.0"] = s["speedup_padded"] >= 1.0
            s["target_varlen_ge_1.5"] = (s["speedup_varlen"] >= 1.5) if pad >= 0.3 else "n/a (<30% padding)"
        else:
            s["note"] = "interpreter vs CPU torch: not a speed-up measurement"
        summary.append(s)
    return summary


def main():
    """Parse arguments, run every shape, print and write the results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32768, help="B * L per batch on the GPU")
    p.add_argument("--seqlens", type=int, nargs="*", default=[128, 256, 512, 1024])
    p.add_argument("--dropout", type=float, default=0.1,
                   help="attention dropout for every method (default 0.1, the shipped configs' value; 0 = off)")
    common.add_common_args(p)
    args = p.parse_args()
    if not triton_available():
        sys.exit("bench_attention: triton is not available (needs the package and CUDA or TRITON_INTERPRET=1)")

    gen = torch.Generator().manual_seed(0)
    smoke = args.smoke or not common.HAS_CUDA
    device = "cuda" if common.HAS_CUDA else "cpu"
    if smoke:
        configs = [(33, 2, 2), (48, 2, 2)]  # (L, B, H): seconds in the interpreter
        if not common.HAS_CUDA:
            print(common.SMOKE_NOTE)
    else:
        configs = [(L, max(1, args.tokens // L), args.heads) for L in args.seqlens]
    results = []
    for L, B, H in configs:
        results += run_one(L, B, H, args.head_dim, DTYPES[args.dtype], gen, device, smoke, args.dropout)
    cols = ["L", "B", "padding_frac", "method", "max_err", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
            "fwd_bwd_tflops", "fwd_bwd_useful_tflops", "peak_mem_mb", "unsupported"]
    common.print_table(results, cols)
    summary = summarize(results)
    print()
    common.print_table(summary, list(summary[0].keys()) if summary else [])
    if not args.no_write:
        path = common.write_results("attention", results,
                                    {"summary": summary, "smoke": smoke, "dropout_p": args.dropout}, args.out_dir)
        common.save_plot(path, f"attention fwd+bwd ms ({args.dtype}, dropout {args.dropout})",
                         lambda ax: common.grouped_bars(ax, results, "L", "method", "fwd_bwd_ms",
                                                        "fwd+bwd ms"))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
