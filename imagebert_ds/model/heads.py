"""Pre-training heads (ImageBERT §4.2; MLM head as BERT's, Devlin et al. 2019 §3.1 / App. A).

* ``MLMHead``    — transform (dense + act + LayerNorm) then a decoder tied to the word embeddings
                   plus a per-token bias; names follow HF ``cls.predictions`` so BERT's head loads.
* ``RegionHead`` — transform then a linear map: MOC (-> num_object_classes logits) and MRFR
                   (-> region_feat_dim regression), applied to the masked regions' outputs.
* ``ITMHead``    — dropout + linear on the pooled [CLS] (tanh(W h_0)) -> 2 logits (0 = mismatch,
                   1 = match).
* ``ITCHead``    — text / image projections to ``embed_dim`` (L2-normalised by the loss) and the
                   learned log inverse temperature (CLIP, Radford et al. 2021 §2.5: init 1/0.07,
                   clamped at 100).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import activation


class PredictionTransform(nn.Module):
    """dense + activation + LayerNorm (BERT's ``BertPredictionHeadTransform``)."""
    def __init__(self, hidden_size: int, act: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = activation(act)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        """(..., H) -> (..., H)."""
        return self.LayerNorm(self.act(self.dense(h)))


class MLMHead(nn.Module):
    """BERT's MLM head: transform, decoder tied to the word embeddings, per-token bias."""
    def __init__(self, hidden_size: int, vocab_size: int, act: str, eps: float,
                 word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = PredictionTransform(hidden_size, act, eps)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied (one Parameter)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., V)
        """(..., H) -> (..., V) vocabulary logits."""
        return self.decoder(self.transform(h)) + self.bias


class RegionHead(nn.Module):
    """transform + linear: MOC class logits or MRFR feature regression."""
    def __init__(self, hidden_size: int, out_dim: int, act: str, eps: float):
        super().__init__()
        self.transform = PredictionTransform(hidden_size, act, eps)
        self.out = nn.Linear(hidden_size, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., out_dim)
        """(..., H) -> (..., out_dim)."""
        return self.out(self.transform(h))


class ITMHead(nn.Module):
    """dropout + linear on the pooled [CLS] -> (mismatch, match) logits."""
    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, 2)
        """(B, H) pooled [CLS] -> (B, 2)."""
        return self.classifier(self.dropout(pooled))


class ITCHead(nn.Module):
    """Text and image projections plus the learned inverse temperature (CLIP)."""
    def __init__(self, hidden_size: int, embed_dim: int, init_temperature: float, max_logit_scale: float):
        super().__init__()
        self.text_proj = nn.Linear(hidden_size, embed_dim)
        self.image_proj = nn.Linear(hidden_size, embed_dim)
        # shape (1,), not a 0-dim scalar: DeepSpeed's parameter broadcast/partitioning views
        # every parameter as bytes, which a 0-dim tensor cannot do.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)

    def scale(self) -> torch.Tensor:
        """exp(clamp(logit_scale, 0, log max)) — the inverse temperature (scalar)."""
        return self.logit_scale.clamp(0.0, self.max_log_scale).exp().squeeze(0)

    def text(self, h_cls: torch.Tensor) -> torch.Tensor:   # (B, H) -> (B, E), unit norm
        """(B, H) text [CLS] -> (B, E) unit-norm embedding."""
        return F.normalize(self.text_proj(h_cls), dim=-1)

    def image(self, h_cls: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, E), unit norm
        """(B, H) image [CLS] -> (B, E) unit-norm embedding."""
        return F.normalize(self.image_proj(h_cls), dim=-1)
