"""Image-text retrieval metrics and the cross-encoder pair scorer (ImageBERT §5.1, zero-shot).

Conventions (Karpathy splits, ``PAPERS.md``): image→text R@K counts an image as a hit when any
of its captions ranks in the top K of all captions; text→image R@K counts a caption as a hit when
its own image ranks in the top K of all images. Results are percentages; ``rsum`` is the sum of
the six recalls, as in the papers' tables. **Ties count against the model**: the rank of the
ground truth is the number of wrong candidates scoring at least as high as it, so a model that
gives every pair the same score gets R@1 = 0 whatever the sort order would have said.

``itm_row_scores`` is the one place pairs go through the cross-encoder (the ITM "match" logit):
one image's regions broadcast over fixed chunks of its captions. The full and the two-stage
evaluators (``evaluate.py``) both call it, so a pair's score depends only on the image, the list of
captions scored for it and the batch size -- which is what makes two-stage with k >= every
candidate equal to full bit for bit, and a run on N ranks equal to one on 1.
"""
from __future__ import annotations

import dataclasses

import torch

DIRECTIONS = ("image_to_text", "text_to_image")


def recall_at_k(scores: torch.Tensor, text_to_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10),
                scores_t2i: torch.Tensor | None = None) -> dict:
    """R@K in both directions, in percent, and ``rsum``.

    ``scores`` (n_img, n_txt) ranks the captions of each image (higher = better);
    ``scores_t2i`` (n_txt, n_img) ranks the images of each caption and defaults to ``scores.T``
    (a re-ranking evaluator gives two different matrices). ``text_to_image`` (n_txt,) is the
    image row of each caption. Images without a caption are left out of image→text.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_images, n_texts), got shape {tuple(scores.shape)}")
    n_img, n_txt = scores.shape
    t2i = text_to_image.to(scores.device).long()
    if t2i.shape != (n_txt,):
        raise ValueError(f"text_to_image must have shape ({n_txt},), got {tuple(t2i.shape)}")
    if n_txt and (t2i.min() < 0 or t2i.max() >= n_img):
        raise ValueError(f"text_to_image holds image rows outside [0, {n_img})")
    if scores_t2i is None:
        scores_t2i = scores.t()
    elif scores_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i must have shape ({n_txt}, {n_img}), got "
                         f"{tuple(scores_t2i.shape)}")
    scores_t2i = scores_t2i.to(scores.device)
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {ks}")

    # image -> text: wrong captions scoring >= the best own caption
    own = t2i[None, :] == torch.arange(n_img, device=scores.device)[:, None]   # (n_img, n_txt)
    has_caption = own.any(dim=1)
    best = scores.masked_fill(~own, float("-inf")).amax(dim=1)                    # (n_img,)
    rank_i = ((scores >= best[:, None]) & ~own).sum(dim=1)
    # text -> image: wrong images scoring >= the own image
    gt = scores_t2i.gather(1, t2i[:, None])                                       # (n_txt, 1)
    is_gt = torch.zeros_like(scores_t2i, dtype=torch.bool).scatter_(1, t2i[:, None], True)
    rank_t = ((scores_t2i >= gt) & ~is_gt).sum(dim=1)                             # (n_txt,)

    n_valid = max(1, int(has_caption.sum()))
    out: dict = {"image_to_text": {}, "text_to_image": {}}
    for k in ks:
        out["image_to_text"][f"R@{k}"] = 100.0 * int(((rank_i < k) & has_caption).sum()) / n_valid
        out["text_to_image"][f"R@{k}"] = 100.0 * int((rank_t < k).sum()) / max(1, n_txt)
    out["rsum"] = sum(out["image_to_text"].values()) + sum(out["text_to_image"].values())
    return out


def mean_recalls(results: list[dict]) -> dict:
    """The mean of several ``recall_at_k`` results (COCO 1K: five folds); ``rsum`` of the means."""
    out: dict = {}
    for d in DIRECTIONS:
        out[d] = {k: sum(r[d][k] for r in results) / len(results) for k in results[0][d]}
    out["rsum"] = sum(out["image_to_text"].values()) + sum(out["text_to_image"].values())
    return out


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def itm_row_scores(model, split, image: int, texts: torch.Tensor | None = None,
                   batch_size: int = 512, device="cpu",
                   autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """ITM match logits (log-odds) of image row ``image`` against captions ``texts`` (ascending
    indices; None = every caption), (len(texts),) float32 on the CPU.

    The image's regions (cut to its real ones) are broadcast over chunks of ``batch_size``
    captions taken in the given order, each chunk cut to its longest caption. ``model`` is in eval
    mode (no dropout), so the same image, caption list and batch size give the same bits.
    """
    device = torch.device(device)
    if texts is None:
        texts = torch.arange(split.num_texts)
    out = torch.empty(len(texts), dtype=torch.float32)
    dtype = _model_dtype(model)
    if getattr(model.config, "pixel_input", False):  # Pixel-BERT: the image's pixels, broadcast
        pixels = split.pixel_values[image:image + 1].to(device, dtype)      # (1, 3, S, S)
        image_of = lambda b: {"pixel_values": pixels.expand(b, -1, -1, -1)}  # noqa: E731
    else:
        rmask = split.region_mask[image]
        n_reg = int(rmask.nonzero().max()) + 1 if bool(rmask.any()) else 1
        feats = split.region_feats[image:image + 1, :n_reg].to(device, dtype)  # (1, R', D)
        boxes = split.region_boxes[image:image + 1, :n_reg].to(device, dtype)  # (1, R', 5)
        rmask = rmask[None, :n_reg].to(device)                                 # (1, R')
        image_of = lambda b: {"region_feats": feats.expand(b, -1, -1),  # noqa: E731
                              "region_boxes": boxes.expand(b, -1, -1),
                              "region_mask": rmask.expand(b, -1)}
    use_amp = autocast_dtype is not None and autocast_dtype != torch.float32
    for s in range(0, len(texts), batch_size):
        idx = texts[s:s + batch_size]
        am = split.attention_mask[idx]
        lt = int(am.sum(1).max())
        b = len(idx)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_amp):
            logit = model.itm_scores(
                input_ids=split.input_ids[idx, :lt].to(device), attention_mask=am[:, :lt].to(device),
                as_prob=False, **image_of(b))
        out[s:s + b] = logit.float().cpu()
    return out


def first_images(split, n: int):
    """The split restricted to its first ``n`` images and their captions."""
    return image_range(split, 0, n)


def image_range(split, start: int, stop: int):
    """The split restricted to image rows ``[start, stop)`` and their captions (rows renumbered
    from 0): a COCO 1K fold."""
    keep_t = (split.text_to_image >= start) & (split.text_to_image < stop)
    return dataclasses.replace(
        split, image_ids=split.image_ids[start:stop], input_ids=split.input_ids[keep_t],
        attention_mask=split.attention_mask[keep_t],
        text_to_image=split.text_to_image[keep_t] - start,
        captions=[c for c, k in zip(split.captions, keep_t.tolist()) if k],
        region_feats=None if split.region_feats is None else split.region_feats[start:stop],
        region_boxes=None if split.region_boxes is None else split.region_boxes[start:stop],
        region_mask=None if split.region_mask is None else split.region_mask[start:stop],
        pixel_values=None if split.pixel_values is None else split.pixel_values[start:stop])
