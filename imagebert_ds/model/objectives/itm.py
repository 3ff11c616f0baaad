"""ITM — image-text matching (ImageBERT §4.2 task 4) and its retrieval fine-tuning losses (§5.2).

2-way classifier (0 = mismatch, 1 = match) on the pooled [CLS]; ``s = logit[1] - logit[0]`` ranks
pairs for retrieval. ``negatives``: ``collator`` (the loader's swapped captions) or ``random`` /
``hard`` (mined from the local batch; ``hard`` needs ``itc``); ``loss``: ``binary``,
``multiclass`` or ``triplet``. Why positives are re-scored under MLM: docs/training.md, "The model".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .. import losses as L
from ..heads import ITMHead
from .base import EncoderPass, Objective, ObjectiveConfig

_NEVER = -1e4  # a masked-out negative's score: exp() underflows to exactly 0 in the softmax


@dataclass
class ITMConfig(ObjectiveConfig):
    """Where negatives come from, how many, and the loss over them (none changes the head)."""
    negatives: Literal["collator", "random", "hard"] = "collator"
    loss: Literal["binary", "multiclass", "triplet"] = "binary"
    num_negatives: int = 3  # per positive and direction (random / hard)
    margin: float = 0.2  # triplet
    exclude_same_caption: bool = False  # random / hard: no negative with the anchor's exact text

    def __post_init__(self):
        super().__post_init__()
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.negatives == "collator" and self.loss != "binary":
            raise ValueError(f"loss '{self.loss}' needs negatives chosen by the model: set "
                             "negatives to random or hard (collator negatives are one per row)")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")

    def head_options(self) -> dict:
        """None of ITM's options shapes its head: pre-training and fine-tuning share it."""
        return {}


class ImageTextMatching(Objective):
    """ITM objective: the match classifier on the pooled [CLS], trained with collator
    negatives (pre-training) or mined ones (retrieval fine-tuning)."""
    name = "itm"
    Config = ITMConfig

    def __init__(self, config, options: ITMConfig, encoder):
        super().__init__(config, options)
        self.head = ITMHead(config.hidden_size, config.hidden_dropout_prob)
        self.image_key = "pixel_values" if config.pixel_input else "region_feats"

    def needs(self) -> tuple[str, ...]:
        """``itm_labels`` (collator negatives), or ``image_ids`` (negatives from the batch)."""
        if self.options.negatives == "collator":
            return ("itm_labels",)
        return ("image_ids", self.image_key)

    def logits(self, encoder, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, H) encoder output -> (B, 2) match logits."""
        return self.head(encoder.pool(hidden))

    def loss(self, p: EncoderPass) -> torch.Tensor:
        """Collator negatives: cross-entropy against ``itm_labels`` (all pairs). Otherwise the
        configured fine-tuning loss over mined negatives in both directions."""
        logits = self.logits(p.encoder, p.hidden)                            # (B, 2)
        if p.logits is not None:
            p.logits["itm_logits"] = logits
        if self.options.negatives == "collator":
            return L.cross_entropy_loss(logits, p.batch["itm_labels"])
        return self._finetune_loss(p, logits)

    # --- fine-tuning ----------------------------------------------------------------------------
    def _finetune_loss(self, p: EncoderPass, pos_logits: torch.Tensor) -> torch.Tensor:
        o, b = self.options, p.batch
        texts = _original_text(b)
        neg_t, ok_t, neg_i, ok_i = self.choose_negatives(p)                  # (B, N) each
        B, N = neg_t.shape
        rows = torch.arange(B, device=neg_t.device)[:, None].expand(B, N).reshape(-1)
        # image i with caption neg_t[i, j] (i2t), caption i with image neg_i[i, j] (t2i)
        t_idx = torch.cat([neg_t.reshape(-1), rows])
        i_idx = torch.cat([rows, neg_i.reshape(-1)])
        rescore = b.get("mlm_labels") is not None  # the joint pass read masked text (docstring)
        if rescore:  # + each positive pair on its original text, (B,) more rows
            own = torch.arange(B, device=neg_t.device)
            t_idx, i_idx = torch.cat([t_idx, own]), torch.cat([i_idx, own])
        vf = p.visual_features
        h = p.encoder(texts[t_idx], b["attention_mask"][t_idx], _take(b, "token_type_ids", t_idx),
                      _take(b, "region_feats", i_idx), _take(b, "region_boxes", i_idx),
                      _take(b, "region_mask", i_idx),
                      _take(b, "pixel_values", i_idx) if vf is None else None,
                      None if vf is None else vf[i_idx])
        logits = self.logits(p.encoder, h).float()                           # (2BN [+ B], 2)
        neg_logits = logits[:2 * B * N].view(2, B, N, 2)                     # (dir, B, N, 2)
        ok = torch.stack([ok_t, ok_i]) & p.matched[None, :, None]            # (dir, B, N)
        pos = logits[2 * B * N:] if rescore else pos_logits.float()          # (B, 2)
        if o.loss == "binary":
            pos_ce = F.cross_entropy(pos, torch.ones(B, dtype=torch.long, device=pos.device),
                                     reduction="none")                      # (B,)
            neg_ce = F.cross_entropy(neg_logits.reshape(-1, 2),
                                     torch.zeros_like(rows).repeat(2),
                                     reduction="none").view(2, B, N)
            total = (pos_ce * p.matched).sum() + (neg_ce * ok).sum()
            return L._mean(total, p.matched.sum() + ok.sum())
        s_pos = pos[:, 1] - pos[:, 0]                                        # (B,)
        s_neg = (neg_logits[..., 1] - neg_logits[..., 0]).masked_fill(~ok, _NEVER)
        if o.loss == "multiclass":
            cand = torch.cat([s_pos[None, :, None].expand(2, B, 1), s_neg], -1)  # (dir, B, 1+N)
            ce = -cand.log_softmax(-1)[..., 0]                               # (dir, B)
            has = ok.any(-1)
            return L._mean((ce * has).sum(), has.sum())
        hardest = s_neg.max(-1).values                                       # (dir, B)
        has = ok.any(-1)
        hinge = (o.margin - s_pos[None] + hardest).clamp(min=0) * has
        return L._mean(hinge.sum(), has.sum())

    @torch.no_grad()
    def choose_negatives(self, p: EncoderPass):
        """For every row: ``num_negatives`` caption rows (image→text) and image rows (text→
        image) of other images, with a validity mask (fewer other images than N in the batch)."""
        b, o = p.batch, self.options
        ids = b["image_ids"]
        B = ids.shape[0]
        other = (ids[:, None] != ids[None, :]) & p.matched[None, :]          # (B, B) valid pairs
        if o.exclude_same_caption:  # a caption identical to the anchor's is a false negative
            t = _original_text(b).masked_fill(b["attention_mask"] == 0, 0)   # (B, Lt)
            other = other & ~(t[:, None, :] == t[None, :, :]).all(-1)
        if o.negatives == "hard":
            if p.objectives is None or "itc" not in p.objectives:
                raise RuntimeError("itm negatives 'hard' mines them by ITC similarity: add an itc "
                                   "objective to this stage")
            itc = p.objectives["itc"]
            img = itc.embed_batch_image(p.encoder, b, p.visual_features)
            txt = itc.embed_text(p.encoder, _original_text(b), b["attention_mask"],
                                 b.get("token_type_ids"))
            sim_i2t = img.float() @ txt.float().T                            # (B, B)
            sim_t2i = sim_i2t.T
        else:
            sim_i2t = torch.rand(B, B, device=ids.device)
            sim_t2i = torch.rand(B, B, device=ids.device)
        N = min(o.num_negatives, max(B - 1, 1))
        out = []
        for sim in (sim_i2t, sim_t2i):
            sim = sim.masked_fill(~other, float("-inf"))
            top = sim.topk(N, dim=1)
            out += [top.indices, torch.isfinite(top.values)]
        return out[0], out[1], out[2], out[3]

    def flops(self, batch, config, n_params):
        """The extra cross-encoder passes over 2N pairs per row (+ the positive itself when MLM
        masked the text; and the two no-grad ITC passes of hard mining, at a third of a
        training pass each)."""
        if self.options.negatives == "collator":
            return 0.0
        from ..flops import encoder_flops, image_lengths

        text = batch["attention_mask"].sum(1)
        image = image_lengths(batch, config, self.training)
        N = self.options.num_negatives
        passes = 2 * N + (batch.get("mlm_labels") is not None)  # pairs per row
        total = encoder_flops(config, n_params, (text + image).repeat(passes))
        if self.options.negatives == "hard":
            total = total + encoder_flops(config, n_params, torch.cat([text, image + 1])) / 3
        return total


def _original_text(b: dict) -> torch.Tensor:
    ids = b["input_ids"]
    if b.get("mlm_labels") is not None:
        ids = torch.where(b["mlm_labels"] != -100, b["mlm_labels"], ids)
    return ids


def _take(b: dict, key: str, idx: torch.Tensor):
    v = b.get(key)
    return None if v is None else v[idx]
