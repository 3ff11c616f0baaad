"""Pre-training losses (ImageBERT §4.2) on already-selected rows: CE, KL, MSE and symmetric InfoNCE.

Masked losses return ``sum / max(n, 1)``: an empty selection gives an exact 0 still connected to the
head (no host sync). ``itc_loss`` all-gathers embeddings with gradient across ranks (open_clip
``ClipLoss``); every rank must pass the same batch size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _mean(total: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    if isinstance(n, torch.Tensor):
        return total / n.clamp(min=1).to(total.dtype)
    return total / max(n, 1)


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (N, C), labels (N,) -> mean CE (0 when N == 0)."""
    return _mean(F.cross_entropy(logits.float(), labels, reduction="sum"), labels.shape[0])


def kl_loss(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)); logits, target_probs (N, C) -> mean over N."""
    if logits.shape != target_probs.shape:
        raise ValueError(f"moc_probs has {target_probs.shape[-1]} classes, the MOC head predicts "
                         f"{logits.shape[-1]} (num_object_classes)")
    logq = logits.float().log_softmax(-1)
    p = target_probs.float()
    kl = (torch.xlogy(p, p) - p * logq).sum(-1)  # (N,), 0 log 0 = 0
    return _mean(kl.sum(), logits.shape[0])


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target (N, D) -> mean over N of the per-region mean squared error."""
    se = (pred.float() - target.float()).pow(2).mean(-1)  # (N,)
    return _mean(se.sum(), pred.shape[0])


def _dist_world():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor, world: int) -> torch.Tensor:
    """(B, E) on each rank -> (world * B, E), rank-major, gradients flow back to every rank."""
    if world == 1:
        return x
    import torch.distributed.nn.functional as dist_fn
    return torch.cat(dist_fn.all_gather(x), dim=0)


def itc_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
             valid: Optional[torch.Tensor] = None, return_logits: bool = False):
    """Symmetric InfoNCE.

    img, txt (B, E) unit-norm embeddings of the local rows (row i of both = one image-text pair);
    scale: inverse temperature (scalar); valid (B,) bool: rows that take part (matched pairs) — the
    others are neither anchors nor negatives. Returns the loss (mean over local valid anchors of
    (CE_i2t + CE_t2i) / 2), and the (B, world*B) image->text logits when ``return_logits``.
    """
    B = img.shape[0]
    if valid is None:
        valid = torch.ones(B, dtype=torch.bool, device=img.device)
    rank, world = _dist_world()
    img_all = gather_with_grad(img, world)                                 # (W*B, E)
    txt_all = gather_with_grad(txt, world)
    if world > 1:
        import torch.distributed as dist
        valid_all = [torch.empty_like(valid) for _ in range(world)]
        dist.all_gather(valid_all, valid.contiguous())
        valid_all = torch.cat(valid_all)                                     # (W*B,)
    else:
        valid_all = valid
    # |logit| <= max_logit_scale (unit vectors), so -1e4 is an exact "never" for softmax
    col_mask = ~valid_all[None, :]
    logits_i2t = (scale * img.float() @ txt_all.float().T).masked_fill(col_mask, -1e4)  # (B, W*B)
    logits_t2i = (scale * txt.float() @ img_all.float().T).masked_fill(col_mask, -1e4)
    labels = torch.arange(B, device=img.device) + rank * B
    ce = (F.cross_entropy(logits_i2t, labels, reduction="none")
          + F.cross_entropy(logits_t2i, labels, reduction="none")) / 2      # (B,)
    loss = _mean(torch.where(valid, ce, torch.zeros_like(ce)).sum(), valid.sum())
    return (loss, logits_i2t) if return_logits else loss
