"""Benchmark: retrieval evaluation -- cross-encoder pairs/s, ``full`` vs ``two-stage`` wall time.

    python benchmarks/bench_eval.py    # GPU: Flickr-sized, BERT-base, bf16; CPU: labelled smoke run

Baseline: ``full`` (every image-caption pair through the ITM cross-encoder, what the project did
before two-stage). Compared: ``two-stage`` (ITC embeddings of every image and caption, then ITM
re-scoring of the top-k candidates per query in both directions; ``imagebert_ds.eval.evaluate``).
The test set is synthetic and Flickr30k-shaped: N images x 5 captions of 10-40 tokens, R detector
regions per image (GPU: 1,000 x 5,000, base model, 100 regions, k = 128, the issue's target is
two-stage < 2 minutes on one H100; CPU smoke: 50 x 250, tiny model, 10 regions, k = 16 so that the
candidate lists are a fraction of the split as they are at full size). The model is randomly
initialised: timings do not depend on the weights, recalls are meaningless and not reported.

Reported: the cross-encoder's pairs/s on one image broadcast over ``batch`` captions (median of
repeated timings after warm-up), the wall time of each mode (one run after a warm-up pass), the
pairs each mode scores, and the ratio full / two-stage. On a GPU ``full`` over all 1,000 images
would take many minutes: it is timed on ``--full-images`` images (default 100) and scaled
linearly to the whole split (its cost is exactly proportional to the images), marked as such.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets TRITON_INTERPRET on a CPU-only machine before triton loads)
import torch  # noqa: E402

from imagebert_ds.data.retrieval_split import RetrievalSplit  # noqa: E402
from imagebert_ds.eval.evaluate import EvalOptions, evaluate_split  # noqa: E402
from imagebert_ds.eval.retrieval import first_images, itm_row_scores  # noqa: E402
from imagebert_ds.model import PretrainingConfig, ImageBERTForPretraining  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def synthetic_split(cfg: PretrainingConfig, images: int, caps_per_image: int, regions: int,
                    generator: torch.Generator) -> RetrievalSplit:
    """Random regions (all real) and random captions of 10-40 tokens, padded like the loader."""
    g = generator
    n_txt = images * caps_per_image
    lens = torch.randint(10, 41, (n_txt,), generator=g)
    L = int(lens.max())
    attn = (torch.arange(L)[None, :] < lens[:, None]).long()
    ids = torch.randint(1000, cfg.vocab_size, (n_txt, L), generator=g)
    ids[:, 0] = cfg.cls_token_id
    ids[torch.arange(n_txt), lens - 1] = cfg.sep_token_id
    ids[attn == 0] = cfg.pad_token_id
    xy = torch.rand(images, regions, 2, generator=g) * 0.5
    wh = torch.rand(images, regions, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + wh, wh[..., :1] * wh[..., 1:]], dim=-1)
    return RetrievalSplit(
        image_ids=torch.arange(images), input_ids=ids, attention_mask=attn,
        text_to_image=torch.arange(images).repeat_interleave(caps_per_image),
        captions=[""] * n_txt,
        region_feats=torch.rand(images, regions, cfg.region_feat_dim, generator=g),
        region_boxes=boxes, region_mask=torch.ones(images, regions, dtype=torch.long))


def timed(fn) -> tuple[float, dict]:
    """Seconds of one call of ``fn`` (synchronised on a GPU) and its result."""
    if common.HAS_CUDA:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if common.HAS_CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    """Build the split and the model, time the cross-encoder and both modes, print and write."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model config (default: base on GPU, tiny on CPU)")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--regions", type=int, default=None)
    p.add_argument("--k", type=int, default=None, help="two-stage candidates per query")
    p.add_argument("--batch", type=int, default=None, help="pairs per forward pass")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--attn-impl", choices=["eager", "sdpa", "triton"], default=None)
    p.add_argument("--full-images", type=int, default=None,
                   help="images the full mode is timed on (scaled to the split); default: all on "
                        "the CPU, 100 on a GPU")
    common.add_common_args(p)
    args = p.parse_args()
    smoke = args.smoke or not common.HAS_CUDA
    device = torch.device("cuda" if common.HAS_CUDA else "cpu")
    model_cfg = args.model or str(REPO / "configs" / "model" / ("tiny.yaml" if smoke else "base.yaml"))
    images = args.images or (50 if smoke else 1000)
    regions = args.regions or (10 if smoke else 100)
    k = args.k or (16 if smoke else 128)
    batch = args.batch or (128 if smoke else 512)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    full_images = min(images, args.full_images or (images if smoke else 100))

    overrides = ["objectives={itm: 1.0, itc: {embed_dim: 256}}",
                 f"max_regions={max(regions, 1)}"]
    if args.attn_impl:
        overrides.append(f"attn_impl={args.attn_impl}")
    cfg = PretrainingConfig.from_yaml(model_cfg, overrides)
    torch.manual_seed(0)
    model = ImageBERTForPretraining(cfg).to(device).eval()
    split = synthetic_split(cfg, images, args.captions_per_image, regions,
                            torch.Generator().manual_seed(0))
    opts = EvalOptions(batch_size=batch, device=device, dtype=dtype, progress=not smoke)

    # the cross-encoder alone: one image broadcast over `batch` captions
    texts = torch.arange(min(batch, split.num_texts))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    ms = common.bench_ms(lambda: itm_row_scores(model, split, 0, texts, batch, device, amp),
                         smoke_reps=3)
    pairs_per_s = len(texts) / (ms * 1e-3)

    evaluate_split(model, first_images(split, 2), "two-stage", k=k, opts=opts)  # warm-up
    two_s, two = timed(lambda: evaluate_split(model, split, "two-stage", k=k, opts=opts))
    sub = first_images(split, full_images)
    full_sub_s, full = timed(lambda: evaluate_split(model, sub, "full", opts=opts))
    scale = images / full_images
    full_s = full_sub_s * scale
    rows = [
        {"mode": "cross-encoder", "pairs": len(texts), "seconds": ms * 1e-3,
         "pairs_per_s": pairs_per_s},
        {"mode": "full (baseline)", "pairs": split.num_images * split.num_texts, "seconds": full_s,
         "pairs_per_s": full["pairs_scored"] * 1.0 / full_sub_s,
         "timed_on_images": full_images, "extrapolated": full_images < images},
        {"mode": f"two-stage (k={k})", "pairs": two["pairs_scored"], "seconds": two_s,
         "pairs_per_s": two["pairs_scored"] / two_s, "speedup_vs_full": full_s / two_s},
    ]
    shapes = {"model": Path(model_cfg).name, "images": images, "captions": split.num_texts,
              "regions": regions, "k": k, "batch": batch, "dtype": dtype,
              "attn_impl": cfg.attn_impl, "text_len": "10-40"}
    print(f"[bench_eval] {common.device_name()} ({common.MODE}) {shapes}")
    common.print_table(rows, ["mode", "pairs", "seconds", "pairs_per_s", "speedup_vs_full"])
    ratio = full_s / two_s
    note = f" (full timed on {full_images} images, scaled x{scale:g})" if full_images < images else ""
    print(f"full / two-stage wall time: {ratio:.2f}x{note}")
    if not args.no_write:
        path = common.write_results("eval", rows, {"shapes": shapes,
                                                   "ratio_full_over_two_stage": ratio},
                                    args.out_dir)
        for r in rows:
            r["size"] = f"{images} img"
        common.save_plot(path, "retrieval evaluation: wall seconds per mode",
                         lambda ax: common.grouped_bars(ax, rows, "size", "mode", "seconds",
                                                        "seconds"))
        print("wrote", path)


if __name__ == "__main__":
    main()
