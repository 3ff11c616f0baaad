"""Benchmark: fused chunked MLM decoder + cross-entropy vs materialized logits + F.cross_entropy.

    python benchmarks/bench_mlm_loss.py             # GPU: vocab 30522, hidden 768; CPU: smoke

N = number of masked (labelled) tokens. Methods, all fwd+bwd with grads for hidden, W, b:
  fused_mlm_loss     kernels.mlm_loss on the full (B*L, H) hidden with -100 labels (selects inside)
  gathered_logits_ce hidden[labels != -100] -> F.linear -> F.cross_entropy   (a careful baseline)
  hf_full_logits_ce  F.linear on every token (B*L = N / 0.15 rows) -> F.cross_entropy(ignore_index)
                     (what HF BertForPreTraining does)
Peak memory = torch.cuda.max_memory_allocated during fwd+bwd above what was allocated before (inputs
and weights are excluded; weight/bias/hidden gradients are included for every method). Target: the
fused loss uses <= 1/4 of the logits + cross-entropy peak at vocab 30522. Memory is only measured on
CUDA; the CPU smoke run reports timings from the interpreter (not meaningful) and no memory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets TRITON_INTERPRET on a CPU-only machine before triton loads)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from imagebert_ds.kernels import triton_available  # noqa: E402
from imagebert_ds.kernels.fused_linear_cross_entropy import mlm_loss  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MASK_RATE = 0.15


def gathered_ce(hidden, weight, bias, labels):
    """Baseline: decoder over the masked rows only, then torch cross-entropy."""
    keep = labels != -100
    logits = F.linear(hidden[keep], weight, bias)
    return F.cross_entropy(logits.float(), labels[keep])


def full_ce(hidden, weight, bias, labels):
    """Baseline: decoder over every row (HF-style full logits), then cross-entropy."""
    logits = F.linear(hidden, weight, bias)  # (B*L, V)
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


def measure(name, fn, inputs, labels, ref_loss):
    """Median time, peak memory and loss error of one method."""
    row = {"method": name}
    try:
        loss = fn(*inputs, labels)
        row["loss_err"] = abs(float(loss.detach()) - ref_loss)
        del loss
        row["fwd_bwd_ms"] = common.bench_ms(lambda: torch.autograd.grad(fn(*inputs, labels), inputs))
        row["peak_mem_mb"] = common.peak_memory_mb(lambda: torch.autograd.grad(fn(*inputs, labels), inputs))
    except torch.cuda.OutOfMemoryError:  # the full-sequence baseline at the largest N may not fit
        row["unsupported"] = "out of memory"
        row["fwd_bwd_ms"] = row["peak_mem_mb"] = None
        torch.cuda.empty_cache()
    return row


def run_one(n_masked, hidden_size, vocab, dtype, gen, device):
    """Every method at one (masked rows, hidden, vocab) shape."""
    n_tokens = int(round(n_masked / MASK_RATE))
    hidden = torch.randn(n_tokens, hidden_size, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    bias = torch.zeros(vocab).to(device, dtype).requires_grad_()
    labels = torch.full((n_tokens,), -100, dtype=torch.long)
    pos = torch.randperm(n_tokens, generator=gen)[:n_masked]
    labels[pos] = torch.randint(0, vocab, (n_masked,), generator=gen)
    labels = labels.to(device)
    ref_loss = float(gathered_ce(hidden.detach().float(), weight.detach().float(), bias.detach().float(), labels))
    inputs = [hidden, weight, bias]
    rows = [measure("fused_mlm_loss", mlm_loss, inputs, labels, ref_loss),
            measure("gathered_logits_ce", gathered_ce, inputs, labels, ref_loss),
            measure("hf_full_logits_ce", full_ce, inputs, labels, ref_loss)]
    for r in rows:
        r.update(n_masked=n_masked, n_tokens=n_tokens, hidden=hidden_size, vocab=vocab,
                 dtype=str(dtype).replace("torch.", ""))
    fused = rows[0]
    for base in rows[1:]:
        key = base["method"]
        if base["fwd_bwd_ms"] is None or fused["fwd_bwd_ms"] is None:
            continue
        fused[f"time_ratio_vs_{key}"] = fused["fwd_bwd_ms"] / base["fwd_bwd_ms"]
        if fused["peak_mem_mb"] is not None and base["peak_mem_mb"] is not None:
            fused[f"mem_ratio_vs_{key}"] = fused["peak_mem_mb"] / base["peak_mem_mb"]
            fused[f"target_mem_le_0.25_vs_{key}"] = fused[f"mem_ratio_vs_{key}"] <= 0.25
    return rows


def main():
    """Parse arguments, run every shape, print and write the results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--masked", type=int, nargs="*", default=[1024, 4096, 16384])
    common.add_common_args(p)
    args = p.parse_args()
    if not triton_available():
        sys.exit("bench_mlm_loss: triton is not available (needs the package and CUDA or TRITON_INTERPRET=1)")
    smoke = args.smoke or not common.HAS_CUDA
    device = "cuda" if common.HAS_CUDA else "cpu"
    if not common.HAS_CUDA:
        print(common.SMOKE_NOTE)
    gen = torch.Generator().manual_seed(0)
    configs = [(30, 64, 1000), (61, 48, 1031)] if smoke else [(n, args.hidden, args.vocab) for n in args.masked]
    results = []
    for n, h, v in configs:
        results += run_one(n, h, v, DTYPES[args.dtype], gen, device)
    common.print_table(results, ["n_masked", "n_tokens", "vocab", "method", "loss_err", "fwd_bwd_ms", "peak_mem_mb",
                                 "mem_ratio_vs_gathered_logits_ce", "mem_ratio_vs_hf_full_logits_ce", "unsupported"])
    if not args.no_write:
        path = common.write_results('mlm_loss', results, {'smoke': smoke}, args.out_dir)
        common.save_plot(path, "fused MLM loss vs logits + cross-entropy: fwd+bwd ms",
                         lambda ax: common.grouped_bars(ax, results, "n_masked", "method", "fwd_bwd_ms",
                                                        "fwd+bwd ms"))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
