"""MRFR — masked region feature regression (ImageBERT §4.2 task 3).

For every masked, real region of a matched pair, regress its original RoI feature
(the batch's ``region_feats`` there: the model zeroed them only for the encoder's input) with an L2
loss (mean squared error over regions and dims).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import losses as L
from ..heads import RegionHead
from .base import EncoderPass, Objective, ObjectiveConfig


@dataclass
class MRFRConfig(ObjectiveConfig):
    """MRFR has no options beyond its weight."""


class MaskedRegionFeatureRegression(Objective):
    """MRFR objective: L2 regression of masked regions' original features."""
    name = "mrfr"
    Config = MRFRConfig
    required_keys = ("region_feats", "region_masked")

    def __init__(self, config, options: MRFRConfig, encoder):
        super().__init__(config, options)
        c = config
        self.head = RegionHead(c.hidden_size, c.region_feat_dim, c.hidden_act, c.layer_norm_eps)

    def loss(self, p: EncoderPass) -> torch.Tensor:
        """Mean squared error over masked, real regions of matched pairs."""
        sel = p.region_targets                                               # (B, R)
        if p.logits is None:
            pred = self.head(p.regions[sel])                                 # (N, D_roi)
        else:
            full = self.head(p.regions)
            p.logits["mrfr_pred"] = full
            pred = full[sel]
        return L.mse_loss(pred, p.batch["region_feats"][sel])
