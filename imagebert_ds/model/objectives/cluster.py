"""Cluster — deep multimodal clustering (the image-text relation framework, Sun et al.; PAPERS.md).

A linear head on the joint [CLS] predicts each pair's pseudo-label; the loss is
``Σ w_i CE_i / Σ w_i`` over rows with ``cluster_labels >= 0``. The labels (``cluster_labels``
(B,) int64, ``cluster_weights`` (B,) float32) come from the stage hook
(``imagebert_ds/relation/pseudo_labels.py``); docs/training.md, "Image-text relation objectives".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..flops import encoder_flops, image_lengths
from .base import EncoderPass, Objective, ObjectiveConfig


@dataclass
class ClusterConfig(ObjectiveConfig):
    """Clusters, re-clustering schedule, the sample clustered and its features."""
    weight: float = 0.2  # the relation framework's weight of the clustering loss
    k: int = 4  # clusters = classes of the head
    recluster_every: int = 100  # steps between re-clusterings (the first is before step 1)
    sample_size: int = 5000  # pairs of the stage's data embedded and clustered (over all ranks)
    kmeans_iters: int = 20  # Lloyd iterations after the k-means++ initialisation
    # none | l2 (unit vectors, i.e. spherical) | standardize (zero mean, unit variance per dim,
    # statistics of the clustered sample)
    normalize: Literal["none", "l2", "standardize"] = "l2"
    # joint: the fused [CLS] only; joint+modalities: also the text-only and image-only [CLS]
    features: Literal["joint", "joint+modalities"] = "joint"

    def __post_init__(self):
        super().__post_init__()
        if self.k < 2:
            raise ValueError(f"k must be >= 2, got {self.k}")
        if self.recluster_every < 1:
            raise ValueError(f"recluster_every must be >= 1, got {self.recluster_every}")
        if self.sample_size < self.k:
            raise ValueError(f"sample_size ({self.sample_size}) must be >= k ({self.k})")
        if self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")

    def head_options(self) -> dict:
        """Only the number of classes shapes the head."""
        return {"k": self.k}


class DeepMultimodalClustering(Objective):
    """Predict the trainer's cluster pseudo-label of each pair from the joint [CLS]."""
    name = "cluster"
    Config = ClusterConfig
    required_keys = ("cluster_labels", "cluster_weights")

    def __init__(self, config, options: ClusterConfig, encoder):
        super().__init__(config, options)
        self.head = nn.Linear(config.hidden_size, options.k)

    def loss(self, p: EncoderPass) -> torch.Tensor:
        """Class-balanced cross-entropy of the head's logits against ``cluster_labels``."""
        logits = self.head(p.hidden[:, 0]).float()                           # (B, k)
        labels = p.batch["cluster_labels"]                                   # (B,)
        w = p.batch["cluster_weights"].float() * (labels >= 0)               # (B,)
        ce = nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        if p.logits is not None:
            p.logits["cluster_logits"] = logits
        return (w * ce).sum() / w.sum().clamp(min=1e-12)

    def flops(self, batch, config, n_params):
        """The trainer's labelling pass over the batch: a forward of the joint sequence without
        a backward, a third of a training pass (the periodic re-clustering is not counted)."""
        lens = batch["attention_mask"].sum(1)
        if batch.get("pixel_values" if config.pixel_input else "region_feats") is not None:
            lens = lens + image_lengths(batch, config, False)
        return encoder_flops(config, n_params, lens) / 3.0
