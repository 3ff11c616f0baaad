"""MOC — masked object classification (ImageBERT §4.2 task 2).

For every masked, real region of a matched pair, predict the detector's object class: ``ce`` is
cross-entropy on ``moc_labels``; ``kl`` is KL(detector distribution ``moc_probs`` || prediction)
(UNITER's MRC-kl, the common alternative the paper mentions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .. import losses as L
from ..heads import RegionHead
from .base import EncoderPass, Objective, ObjectiveConfig


@dataclass
class MOCConfig(ObjectiveConfig):
    """``variant``: ``ce`` (class label) or ``kl`` (needs ``moc_probs`` in the batch)."""
    variant: Literal["ce", "kl"] = "ce"


class MaskedObjectClassification(Objective):
    """MOC objective: classify masked regions into the detector's classes."""
    name = "moc"
    Config = MOCConfig

    def __init__(self, config, options: MOCConfig, encoder):
        super().__init__(config, options)
        c = config
        self.head = RegionHead(c.hidden_size, c.num_object_classes, c.hidden_act, c.layer_norm_eps)

    def needs(self) -> tuple[str, ...]:
        """Regions, their mask, and the variant's target (labels or distribution)."""
        target = "moc_probs" if self.options.variant == "kl" else "moc_labels"
        return ("region_feats", "region_masked", target)

    def loss(self, p: EncoderPass) -> torch.Tensor:
        """Mean CE (or KL) over masked, real regions of matched pairs."""
        sel = p.region_targets                                               # (B, R)
        if self.options.variant == "kl":
            probs = p.batch["moc_probs"]
            return L.kl_loss(self._logits(p, sel), probs[sel])
        labels = p.batch["moc_labels"]
        sel = sel & (labels != -100)
        return L.cross_entropy_loss(self._logits(p, sel), labels[sel])

    def _logits(self, p: EncoderPass, sel: torch.Tensor) -> torch.Tensor:
        if p.logits is None:
            return self.head(p.regions[sel])                                 # (N, C)
        full = self.head(p.regions)                                          # (B, R, C)
        p.logits["moc_logits"] = full
        return full[sel]
