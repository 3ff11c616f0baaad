"""ITC — image-text contrastive learning (CLIP-style symmetric InfoNCE; = the relation framework's ``mcl``).

Text-only ``[CLS] text [SEP]`` and image-only ``[CLS] r_1..r_R`` passes on the original (unmasked)
inputs, projected and L2-normalised; matched pairs only; learned ``logit_scale = log(1/T)`` clamped
as CLIP does. Loss: ``losses.itc_loss``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import losses as L
from ..flops import encoder_flops, image_lengths
from ..heads import ITCHead
from .base import EncoderPass, Objective, ObjectiveConfig


@dataclass
class ITCConfig(ObjectiveConfig):
    """Embedding width, initial temperature and the cap on the inverse temperature."""
    embed_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def __post_init__(self):
        super().__post_init__()
        if self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be > 0, got {self.embed_dim}")
        if not 0 < self.init_temperature:
            raise ValueError(f"init_temperature must be > 0, got {self.init_temperature}")
        if self.max_logit_scale < 1.0 / self.init_temperature:
            raise ValueError(f"max_logit_scale ({self.max_logit_scale}) must be >= "
                             f"1/init_temperature ({1.0 / self.init_temperature:.3g})")


class ImageTextContrastive(Objective):
    """ITC objective: symmetric InfoNCE between image-only and text-only [CLS] embeddings."""
    name = "itc"
    Config = ITCConfig
    def __init__(self, config, options: ITCConfig, encoder):
        super().__init__(config, options)
        self.image_key = "pixel_values" if config.pixel_input else "region_feats"
        self.head = ITCHead(config.hidden_size, options.embed_dim, options.init_temperature,
                            options.max_logit_scale)

    def embed_text(self, encoder, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Text-only pass ``[CLS] text [SEP]`` -> (B, embed_dim) unit-norm embedding."""
        h = encoder(input_ids, attention_mask, token_type_ids)                # (B, Lt, H)
        return self.head.text(h[:, 0])

    def needs(self) -> tuple[str, ...]:
        """The image input of the model's ``visual.mode``."""
        return (self.image_key,)

    def embed_image(self, encoder, region_feats=None, region_boxes=None, region_mask=None,
                    pixel_values=None) -> torch.Tensor:
        """Image-only pass ``[CLS] r_1..r_R`` (or ``[CLS]`` + the visual tokens of
        ``pixel_values``) -> (B, embed_dim) unit-norm embedding."""
        return self.head.image(encoder.image_cls(region_feats, region_boxes, region_mask,
                                                 pixel_values))

    def embed_batch_image(self, encoder, b: dict,
                          visual_features=None) -> torch.Tensor:
        """``embed_image`` of a batch dict's image side (regions or pixels; the pixels'
        ``VisualFeatures`` when the caller has them: ``EncoderPass.visual_features``)."""
        if visual_features is not None:
            return self.head.image(encoder.image_cls(visual_features=visual_features))
        if self.image_key == "pixel_values":
            return self.embed_image(encoder, pixel_values=b["pixel_values"])
        return self.embed_image(encoder, b["region_feats"], b.get("region_boxes"),
                                b.get("region_mask"))

    def loss(self, p: EncoderPass) -> torch.Tensor:
        """Symmetric InfoNCE of the image-only vs text-only embeddings of the matched pairs."""
        b = p.batch
        ids = b["input_ids"]
        if b.get("mlm_labels") is not None:
            ids = torch.where(b["mlm_labels"] != -100, b["mlm_labels"], ids)
        txt = self.embed_text(p.encoder, ids, b.get("attention_mask"), b.get("token_type_ids"))
        img = self.embed_batch_image(p.encoder, b, p.visual_features)
        if p.logits is None:
            return L.itc_loss(img, txt, self.head.scale(), p.matched)
        loss, p.logits["itc_logits"] = L.itc_loss(img, txt, self.head.scale(), p.matched, True)
        return loss

    def flops(self, batch, config, n_params):
        """The text-only and image-only passes over the matched pairs' real tokens (unmatched
        rows count as length 0: masks, not indexing, so no host sync)."""
        text = batch["attention_mask"].sum(1)
        image = image_lengths(batch, config, self.training) + 1
        if batch.get("itm_labels") is not None:
            matched = (batch["itm_labels"] == 1).to(text.dtype)
            text, image = text * matched, image * matched
        return encoder_flops(config, n_params, torch.cat([text, image]))
