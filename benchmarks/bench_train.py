"""Benchmark: one ImageBERT pre-training step (forward + backward + AdamW) per attention backend.

    python benchmarks/bench_train.py            # GPU: BERT-base, bf16 autocast; CPU: labelled smoke run

Baseline: the HF-style eager attention (``attn_impl: eager``, padded, L x L scores materialized).
Compared: ``sdpa`` (padded) and, where Triton can run, ``triton`` + ``fused_ops`` (the unpadded
varlen encoder, fused add+LayerNorm, fused MLM loss). Batches are realistic ImageBERT batches:
captions of 10-40 tokens padded to the longest, plus ``--regions`` detector regions per image
(100 in the paper), all five objectives on. Reported per backend: median step time, real
(unpadded) tokens/s, model TFLOP/s with the trainer's FLOP formula (``imagebert_ds.model.flops``),
MFU on a known GPU, peak memory, and the speed-up over the eager baseline.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets TRITON_INTERPRET on a CPU-only machine before triton loads)
import torch  # noqa: E402

from imagebert_ds.kernels import triton_available  # noqa: E402
from imagebert_ds.model import OBJECTIVES, ImageBERTConfig, ImageBERTForPretraining  # noqa: E402
from imagebert_ds.testing import contract_batch  # noqa: E402
from imagebert_ds.train.metrics import device_peak_tflops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_backend(name: str, cfg_dict: dict, batch: dict, dtype, device) -> dict:
    """Median step time, tokens/s, TFLOP/s, MFU and memory of one attention backend."""
    impl, fused = {"eager": ("eager", False), "sdpa": ("sdpa", False),
                   "triton": ("triton", True)}[name]
    cfg = ImageBERTConfig.from_dict({**cfg_dict, "attn_impl": impl, "fused_ops": fused})
    torch.manual_seed(0)
    model = ImageBERTForPretraining(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = common.bench_ms(step)
    real = batch["attention_mask"].sum() + batch["region_mask"].sum()
    flops = float(model.training_flops(batch))  # the trainer's formula (model/flops.py)
    tflops = flops / (ms * 1e-3) / 1e12
    peak = device_peak_tflops()
    return {"backend": name, "step_ms": ms, "tokens_per_s": float(real.sum()) / (ms * 1e-3),
            "tflops": tflops, "mfu": tflops / peak if peak else None,
            "peak_mem_mb": common.peak_memory_mb(step)}


def main() -> None:
    """Build the batch, time every backend, print and write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model config (default: base on GPU, tiny on CPU)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--regions", type=int, default=None)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    common.add_common_args(p)
    args = p.parse_args()
    smoke = args.smoke or not common.HAS_CUDA
    device = torch.device("cuda" if common.HAS_CUDA else "cpu")
    model_cfg = args.model or str(REPO / "configs" / "model" / ("tiny.yaml" if smoke else "base.yaml"))
    batch_size = args.batch or (8 if smoke else 64)
    regions = args.regions or (10 if smoke else 100)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    cfg_dict = ImageBERTConfig.from_yaml(model_cfg).to_dict()
    # the shipped configs' dropout (attention 0.1: in-kernel for triton), every objective on
    cfg_dict.update(max_regions=max(regions, cfg_dict["max_regions"]),
                    objectives={name: 1.0 for name in OBJECTIVES})
    # captions of 10-40 tokens padded to the longest, 15% MLM / region masking, half mismatched
    batch = contract_batch(ImageBERTConfig.from_dict(cfg_dict), batch_size, text_len=(10, 40),
                           regions=regions, generator=torch.Generator().manual_seed(0),
                           mlm_prob=0.15, region_mask_prob=0.15, with_probs=False, device=device)
    backends = ["eager", "sdpa"] + (["triton"] if device.type == "cuda" and triton_available() else [])
    rows = [run_backend(b, cfg_dict, batch, dtype, device) for b in backends]
    base = rows[0]["step_ms"]
    for r in rows:
        r["speedup_vs_eager"] = base / r["step_ms"]
    padded = batch["attention_mask"].numel() + batch["region_mask"].numel()
    real = int(batch["attention_mask"].sum() + batch["region_mask"].sum())
    shapes = {"model": Path(model_cfg).name, "batch": batch_size, "regions": regions,
              "text_len_max": batch["attention_mask"].shape[1], "dtype": str(dtype),
              "padding_frac": 1 - real / padded}
    print(f"[bench_train] {common.device_name()} ({common.MODE}) {shapes}")
    common.print_table(rows, ["backend", "step_ms", "tokens_per_s", "tflops", "mfu",
                              "peak_mem_mb", "speedup_vs_eager"])
    if not args.no_write:
        print("wrote", common.write_results("train_step", rows, {"shapes": shapes}))


if __name__ == "__main__":
    main()
