"""Model FLOPs of a training step on real tokens: ``6 N Σn_i + 12 n_layer H Σn_i²`` (PaLM App. B).

Padding is not counted; objectives add their own work (``Objective.flops``). Formula and MFU:
docs/training.md, "Metrics".
"""
from __future__ import annotations

import torch
from torch import nn


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside the embeddings and the (tied) MLM decoder: ``N`` of the formula."""
    return sum(p.numel() for n, p in model.named_parameters()
               if "embeddings" not in n and "decoder" not in n)


def encoder_flops(config, n_params: int, seq_lens: torch.Tensor) -> torch.Tensor:
    """Training FLOPs of one encoder pass over sequences of real lengths ``seq_lens`` (S,),
    as a float64 tensor on ``seq_lens``' device (no host sync)."""
    lens = seq_lens.double()
    return 6.0 * n_params * lens.sum() + 12.0 * config.num_layers * config.hidden_size * (lens ** 2).sum()


def visual_tokens(visual, height: int, width: int, training: bool) -> int:
    """Visual tokens per image of ``visual.mode`` pixel / patch for (height, width) images: the
    feature map's cells (ResNet stride 4 * 2^(stages-1), or the patch size), ``sample_pixels`` of
    them in training. The CNN's own FLOPs are not counted by this module."""
    if visual.mode == "patch":
        n = (height // visual.patch_size) * (width // visual.patch_size)
    else:
        stride = 4 * 2 ** (visual.backbone_stages - 1)
        n = -(-height // stride) * -(-width // stride)
    return min(n, visual.sample_pixels) if training and visual.sample_pixels else n


def image_lengths(batch: dict, config, training: bool) -> torch.Tensor:
    """(B,) image-side tokens per row of ``batch``: real regions, or visual tokens of pixels."""
    ref = batch["attention_mask"]
    if config.visual.mode != "region":
        H, W = batch["pixel_values"].shape[-2:]
        return torch.full_like(ref[:, 0], visual_tokens(config.visual, H, W, training))
    if batch.get("region_mask") is not None:
        return batch["region_mask"].sum(1)
    return torch.full_like(ref[:, 0], batch["region_feats"].shape[1])
