"""Benchmark: fused residual-add + LayerNorm (Triton) vs eager torch ``F.layer_norm(x + residual)``.

    python benchmarks/bench_layernorm.py            # GPU: full sizes; CPU: labelled smoke run

Rows = tokens of a BERT-base batch (hidden 768). Reported: median fwd / bwd / fwd+bwd time,
effective bandwidth (bytes the fused kernels must move: fwd reads x, residual, writes y; bwd reads
dy, x, residual, writes one gradient -- autograd hands the same tensor to x and residual -- plus
the tiny per-row statistics), and peak memory of fwd+bwd above the inputs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets TRITON_INTERPRET on a CPU-only machine before triton loads)
import torch  # noqa: E402

from imagebert_ds.kernels import triton_available  # noqa: E402
from imagebert_ds.kernels.layernorm import add_layernorm, add_layernorm_ref  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def measure(name, fn, inputs, dy, bytes_fwd, bytes_bwd, ref):
    """Median forward / backward times, bandwidth and error of one method."""
    row = {"method": name}
    out = fn(*inputs)
    row["max_err"] = float((out.detach().float() - ref).abs().max())
    row["fwd_ms"] = common.bench_ms(lambda: fn(*inputs))
    row["bwd_ms"] = common.bench_ms(lambda: torch.autograd.grad(out, inputs, dy, retain_graph=True))
    row["fwd_bwd_ms"] = common.bench_ms(lambda: torch.autograd.grad(fn(*inputs), inputs, dy))
    del out
    row["peak_mem_mb"] = common.peak_memory_mb(lambda: torch.autograd.grad(fn(*inputs), inputs, dy))
    row["fwd_gbps"] = bytes_fwd / (row["fwd_ms"] * 1e-3) / 1e9
    row["bwd_gbps"] = bytes_bwd / (row["bwd_ms"] * 1e-3) / 1e9
    row["fwd_bwd_gbps"] = (bytes_fwd + bytes_bwd) / (row["fwd_bwd_ms"] * 1e-3) / 1e9
    return row


def run_one(n_rows, hidden, dtype, gen, device):
    """Every method at one (rows, hidden) shape."""
    x, r = (torch.randn(n_rows, hidden, generator=gen).to(device, dtype).requires_grad_() for _ in range(2))
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_()
    b = (0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_()
    dy = torch.randn(n_rows, hidden, generator=gen).to(device, dtype)
    ref = add_layernorm_ref(x.detach().float(), r.detach().float(), w.detach().float(), b.detach().float())
    e = x.element_size()
    bytes_fwd = 3 * n_rows * hidden * e + 8 * n_rows
    bytes_bwd = 4 * n_rows * hidden * e + 8 * n_rows
    rows = [
        measure("triton_add_layernorm", lambda *a: add_layernorm(*a, eps=1e-12), [x, r, w, b], dy,
                bytes_fwd, bytes_bwd, ref),
        measure("torch_eager", lambda *a: add_layernorm_ref(*a, eps=1e-12), [x, r, w, b], dy,
                bytes_fwd, bytes_bwd, ref),
    ]
    for row in rows:
        row.update(rows=n_rows, hidden=hidden, dtype=str(dtype).replace("torch.", ""))
    base = rows[1]["fwd_bwd_ms"]
    rows[0]["speedup_fwd_bwd_vs_eager"] = base / rows[0]["fwd_bwd_ms"]
    if not common.HAS_CUDA:
        rows[0]["speedup_fwd_bwd_vs_eager_note"] = "interpreter vs CPU torch: not a speed-up measurement"
    return rows


def main():
    """Parse arguments, run every shape, print and write the results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--rows", type=int, nargs="*", default=[4096, 16384, 65536])
    common.add_common_args(p)
    args = p.parse_args()
    if not triton_available():
        sys.exit("bench_layernorm: triton is not available (needs the package and CUDA or TRITON_INTERPRET=1)")
    smoke = args.smoke or not common.HAS_CUDA
    device = "cuda" if common.HAS_CUDA else "cpu"
    if not common.HAS_CUDA:
        print(common.SMOKE_NOTE)
    gen = torch.Generator().manual_seed(0)
    sizes = [(37, args.hidden), (65, args.hidden)] if smoke else [(n, args.hidden) for n in args.rows]
    results = []
    for n, h in sizes:
        results += run_one(n, h, DTYPES[args.dtype], gen, device)
    common.print_table(results, ["rows", "hidden", "dtype", "method", "max_err", "fwd_ms", "bwd_ms",
                                 "fwd_bwd_ms", "fwd_bwd_gbps", "peak_mem_mb", "speedup_fwd_bwd_vs_eager"])
    if not args.no_write:
        path = common.write_results('layernorm', results, {'smoke': smoke}, args.out_dir)
        common.save_plot(path, "fused add+LayerNorm vs torch: fwd+bwd ms",
                         lambda ax: common.grouped_bars(ax, results, "rows", "method", "fwd_bwd_ms",
                                                        "fwd+bwd ms"))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
