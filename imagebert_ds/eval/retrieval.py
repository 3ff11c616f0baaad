"""Image-text retrieval metrics and all-pairs ITM scoring (ImageBERT §5.1, zero-shot).

Conventions (Karpathy splits, ``PAPERS.md``): image→text R@K counts an image as a hit when any
of its captions ranks in the top K of all captions; text→image R@K counts a caption as a hit when
its own image ranks in the top K of all images. Results are percentages; ``rsum`` is the sum of
the six recalls, as in the papers' tables.

Scoring is all pairs: every (image, caption) pair goes through the cross-encoder and the ITM
head's "match" logit is the score — exact but O(images × captions) forward passes. The image
rows are split across ranks (image i on rank i % world) and gathered. The split is a
``RetrievalSplit`` from ``imagebert_ds.data.load_retrieval_split``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def recall_at_k(scores: torch.Tensor, text_to_image: torch.Tensor,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """``scores`` (n_img, n_txt), higher = better match; ``text_to_image`` (n_txt,) image index."""
    n_img, n_txt = scores.shape
    text_to_image = text_to_image.to(scores.device).long()
    if text_to_image.shape != (n_txt,):
        raise ValueError(f"text_to_image must have shape ({n_txt},), got "
                         f"{tuple(text_to_image.shape)}")
    # image -> text: rank of the best-ranked own caption, per image (n_txt when it has none)
    order = scores.argsort(dim=1, descending=True)                       # (n_img, n_txt)
    own = text_to_image[order] == torch.arange(n_img, device=scores.device)[:, None]
    has_caption = own.any(dim=1)
    first_hit = torch.where(has_caption, own.float().argmax(dim=1), n_txt)
    # text -> image: rank of the own image, per caption
    order_t = scores.t().argsort(dim=1, descending=True)                 # (n_txt, n_img)
    rank_t = (order_t == text_to_image[:, None]).float().argmax(dim=1)
    out = {"image_to_text": {}, "text_to_image": {}}
    valid = has_caption.sum().clamp(min=1)
    for k in ks:
        out["image_to_text"][f"R@{k}"] = 100.0 * (first_hit < k).sum().item() / valid.item()
        out["text_to_image"][f"R@{k}"] = 100.0 * (rank_t < k).float().mean().item()
    out["rsum"] = sum(out["image_to_text"].values()) + sum(out["text_to_image"].values())
    return out


@torch.no_grad()
def itm_score_matrix(model, split, batch_size: int = 512, device="cpu", rank: int = 0,
                     world_size: int = 1) -> torch.Tensor:
    """(n_img, n_txt) ITM match scores for every pair of ``split`` (a RetrievalSplit)."""
    n_img = split.region_feats.shape[0]
    n_txt = split.input_ids.shape[0]
    mine = list(range(rank, n_img, world_size))
    rows_per_rank = -(-n_img // world_size)
    local = torch.full((rows_per_rank, n_txt), float("-inf"))
    ids, am = split.input_ids.to(device), split.attention_mask.to(device)
    for r, i in enumerate(mine):
        feats = split.region_feats[i:i + 1].to(device)
        boxes = split.region_boxes[i:i + 1].to(device)
        rmask = split.region_mask[i:i + 1].to(device)
        for s in range(0, n_txt, batch_size):
            e = min(s + batch_size, n_txt)
            b = e - s
            local[r, s:e] = model.itm_scores(
                input_ids=ids[s:e], attention_mask=am[s:e],
                region_feats=feats.expand(b, -1, -1), region_boxes=boxes.expand(b, -1, -1),
                region_mask=rmask.expand(b, -1), as_prob=False).float().cpu()
    if world_size == 1:
        return local[:n_img]
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    scores = torch.empty(n_img, n_txt)
    for r in range(world_size):
        idx = list(range(r, n_img, world_size))
        scores[idx] = gathered[r][: len(idx)]
    return scores


def first_images(split, n: int):
    """The split restricted to its first ``n`` images and their captions."""
    import dataclasses

    keep_t = split.text_to_image < n
    return dataclasses.replace(
        split, image_ids=split.image_ids[:n], input_ids=split.input_ids[keep_t],
        attention_mask=split.attention_mask[keep_t], text_to_image=split.text_to_image[keep_t],
        captions=[c for c, k in zip(split.captions, keep_t.tolist()) if k],
        region_feats=split.region_feats[:n], region_boxes=split.region_boxes[:n],
        region_mask=split.region_mask[:n],
        pixel_values=None if split.pixel_values is None else split.pixel_values[:n])


def evaluate_itm_retrieval(model, split, batch_size: int = 512, device="cpu", rank: int = 0,
                           world_size: int = 1, max_images: int | None = None) -> dict:
    """Zero-shot ITM retrieval on ``split``: ``recall_at_k``'s dict plus num_images/num_texts."""
    if max_images is not None and max_images < split.region_feats.shape[0]:
        split = first_images(split, max_images)
    scores = itm_score_matrix(model, split, batch_size, device, rank, world_size)
    res = recall_at_k(scores, split.text_to_image)
    res["num_images"], res["num_texts"] = scores.shape
    return res
