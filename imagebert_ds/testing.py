"""Synthetic batches in the batch-contract layout (docs/batch_contract.md), for tests, the
``imagebert-ds smoke`` command and the benchmarks: one factory, so every caller builds the same
structure the collator does (MLM-corrupted text, zeroed masked regions, mismatched pairs);
and ``fault``, the switch of the failure injection that reliability tests use.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch


def fault(name: str) -> bool:
    """Whether the fault ``name`` is injected: ``IMAGEBERT_FAULTS`` lists them, comma
    separated, for tests that show a check catches the failure it guards against (e.g.
    ``no_loader_restore``: a resume that does not restore the data position)."""
    return name in os.environ.get("IMAGEBERT_FAULTS", "").split(",")


def contract_batch(config, batch_size: int, text_len: Union[int, tuple[int, int]] = 12,
                   regions: int = 10, generator: Optional[torch.Generator] = None, *,
                   mlm_prob: float = 0.3, region_mask_prob: float = 0.3,
                   one_target_per_row: bool = False, with_probs: bool = True,
                   device: Union[str, torch.device, None] = None) -> dict[str, torch.Tensor]:
    """A random batch for ``config`` (a ``PretrainingConfig``).

    ``text_len``: an int L pads every caption to L, the second half of the rows 3 tokens shorter
    (so text padding is exercised); a (lo, hi) range draws each caption's length in it and pads to
    the longest. ``regions`` R region slots per image; the last row has R // 2 padded slots.
    Every row has at least one MLM target and one masked region; ``one_target_per_row`` gives
    exactly one of each and no padding at all (so per-micro-batch means of the masked losses
    average to the full-batch mean). Even rows are matched pairs (``itm_labels`` 1), odd rows
    mismatched. ``with_probs`` adds ``moc_probs`` (the MOC ``kl`` variant's targets).
    """
    g, B = generator, batch_size
    R, C = min(regions, config.max_regions), config.num_object_classes
    if isinstance(text_len, int):
        lens = torch.full((B,), text_len)
        if not one_target_per_row:
            lens[B // 2:] = max(3, text_len - 3)
    else:
        lens = torch.randint(text_len[0], text_len[1] + 1, (B,), generator=g)
    Lt = int(lens.max())
    attn = (torch.arange(Lt)[None, :] < lens[:, None]).long()                  # (B, Lt)
    ids = torch.randint(1000, config.vocab_size, (B, Lt), generator=g)
    ids[:, 0] = config.cls_token_id
    ids[torch.arange(B), lens - 1] = config.sep_token_id
    ids[attn == 0] = config.pad_token_id
    inner = (attn == 1) & (ids != config.cls_token_id) & (ids != config.sep_token_id)
    if one_target_per_row:
        mlm_pos = torch.zeros(B, Lt, dtype=torch.bool)
        mlm_pos[torch.arange(B), torch.randint(1, int(lens.min()) - 1, (B,), generator=g)] = True
    else:
        mlm_pos = (torch.rand(B, Lt, generator=g) < mlm_prob) & inner
        mlm_pos[:, 1] = True                                                   # >= 1 per row
    mlm_labels = torch.where(mlm_pos, ids, torch.full_like(ids, -100))
    ids = torch.where(mlm_pos, torch.full_like(ids, config.mask_token_id), ids)

    feats = torch.rand(B, R, config.region_feat_dim, generator=g)
    xy = torch.rand(B, R, 2, generator=g) * 0.5
    wh = torch.rand(B, R, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + wh, wh[..., :1] * wh[..., 1:]], dim=-1)        # (B, R, 5)
    region_mask = torch.ones(B, R, dtype=torch.long)
    if not one_target_per_row:
        region_mask[-1, max(1, R // 2):] = 0
    if one_target_per_row:
        masked = torch.zeros(B, R, dtype=torch.bool)
        masked[torch.arange(B), torch.randint(0, R, (B,), generator=g)] = True
    else:
        masked = (torch.rand(B, R, generator=g) < region_mask_prob) & region_mask.bool()
        masked[:, 0] = True
    labels = torch.randint(0, C, (B, R), generator=g)
    batch = {
        "input_ids": ids, "attention_mask": attn, "token_type_ids": torch.zeros_like(ids),
        "mlm_labels": mlm_labels,
        "region_feats": feats, "region_boxes": boxes,
        "region_mask": region_mask, "region_masked": masked,
        "moc_labels": torch.where(masked, labels, torch.full_like(labels, -100)),
        "itm_labels": (torch.arange(B) % 2 == 0).long(),
    }
    if with_probs:
        probs = torch.rand(B, R, C, generator=g).pow(8)
        batch["moc_probs"] = probs / probs.sum(-1, keepdim=True)
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch
