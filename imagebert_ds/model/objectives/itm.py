"""ITM — image-text matching (ImageBERT §4.2 task 4).

Binary classification (0 = mismatch, 1 = match) from BERT's pooled [CLS] of the joint sequence.
Its "match" logit also scores pairs for zero-shot retrieval (§5.1, ``ImageBERTForPretraining.
itm_scores``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import losses as L
from ..heads import ITMHead
from .base import EncoderPass, Objective, ObjectiveConfig


@dataclass
class ITMConfig(ObjectiveConfig):
    """ITM has no options beyond its weight."""


class ImageTextMatching(Objective):
    """ITM objective: cross-entropy of the pooled [CLS] against ``itm_labels``."""
    name = "itm"
    Config = ITMConfig
    required_keys = ("itm_labels",)

    def __init__(self, config, options: ITMConfig, encoder):
        super().__init__(config, options)
        self.head = ITMHead(config.hidden_size, config.hidden_dropout_prob)

    def logits(self, encoder, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, H) encoder output -> (B, 2) match logits."""
        return self.head(encoder.pool(hidden))

    def loss(self, p: EncoderPass) -> torch.Tensor:
        """Cross-entropy of the match logits against ``itm_labels`` (all pairs)."""
        logits = self.logits(p.encoder, p.hidden)                            # (B, 2)
        if p.logits is not None:
            p.logits["itm_logits"] = logits
        return L.cross_entropy_loss(logits, p.batch["itm_labels"])
