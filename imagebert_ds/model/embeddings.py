"""Text and region embeddings (ImageBERT §3.2, Fig. 1).

Text: BERT's word + position + segment, LayerNorm, dropout. Region i: LN(W_f f_i) + LN(W_l l_i) +
segment[1] + one shared learned ``region_position`` (RoIs have no order, §3.2), then the same
LayerNorm + dropout. Sequence: ``[CLS] text [SEP] | r_1 ... r_R``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import ImageBERTConfig

REGION_SEGMENT = 1


class Embeddings(nn.Module):
    """Text embeddings (BERT's) and region embeddings (feature + location projections, §3.2)."""
    def __init__(self, c: ImageBERTConfig):
        super().__init__()
        H = c.hidden_size
        # text side: HF BertEmbeddings names
        self.word_embeddings = nn.Embedding(c.vocab_size, H)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, H)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, H)
        self.LayerNorm = nn.LayerNorm(H, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.max_regions = c.max_regions
        if c.pixel_input:  # Pixel-BERT / patches (visual.py); fresh when loading a BERT checkpoint
            from .visual import VisualEmbeddings

            self.visual = VisualEmbeddings(c)
            return
        # region side (fresh when loading a BERT checkpoint)
        self.region_feat_proj = nn.Linear(c.region_feat_dim, H)
        self.region_feat_ln = nn.LayerNorm(H, eps=c.layer_norm_eps)
        self.region_loc_proj = nn.Linear(c.region_loc_dim, H)
        self.region_loc_ln = nn.LayerNorm(H, eps=c.layer_norm_eps)
        self.region_position = nn.Parameter(torch.zeros(H))

    def text(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (B, Lt) -> (B, Lt, H)."""
        B, Lt = input_ids.shape
        if Lt > self.position_embeddings.num_embeddings:
            raise ValueError(f"text length {Lt} exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}")
        pos = torch.arange(Lt, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        e = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None] \
            + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(e))

    def regions(self, feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """feats (B, R, 2048), boxes (B, R, 5) -> (B, R, H)."""
        if feats.shape[:2] != boxes.shape[:2]:
            raise ValueError(f"region_feats {tuple(feats.shape)} and region_boxes "
                             f"{tuple(boxes.shape)} disagree on (B, R)")
        if feats.shape[1] > self.max_regions:
            raise ValueError(f"{feats.shape[1]} regions exceed max_regions={self.max_regions}")
        dtype = self.region_feat_proj.weight.dtype
        e = self.region_feat_ln(self.region_feat_proj(feats.to(dtype))) \
            + self.region_loc_ln(self.region_loc_proj(boxes.to(dtype))) \
            + self.token_type_embeddings.weight[REGION_SEGMENT] + self.region_position
        return self.dropout(self.LayerNorm(e))

    def pixels(self, pixel_values: Optional[torch.Tensor], features=None):
        """pixel_values (B, 3, S, S), or their ``features`` (``visual.features``, a
        ``VisualFeatures``) -> ((B, V, H) visual tokens, (B, V) bool mask, False = padding)
        (pixel / patch mode, visual.py)."""
        if not hasattr(self, "visual"):
            raise ValueError("pixel_values given, but this model's visual.mode is 'region'")
        e, real = self.visual(pixel_values, self.token_type_embeddings.weight[REGION_SEGMENT],
                              features)
        return self.dropout(self.LayerNorm(e)), real
