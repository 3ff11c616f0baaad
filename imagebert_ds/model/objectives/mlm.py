"""MLM — masked language modelling (ImageBERT §4.2 task 1; BERT, Devlin et al. 2019 §3.1).

Predicts the original token at every ``mlm_labels != -100`` position of a matched pair, through
BERT's head (transform + decoder tied to the word embeddings + bias; HF ``cls.predictions``
names, so a BERT checkpoint's head loads). With ``fused_ops`` the decoder and cross-entropy run
as one chunked Triton kernel (``imagebert_ds.kernels.FusedMLMLoss``) that never builds the (N, V)
logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from imagebert_ds.kernels.modules import FusedMLMLoss

from .. import losses as L
from ..heads import MLMHead
from .base import EncoderPass, Objective, ObjectiveConfig


@dataclass
class MLMConfig(ObjectiveConfig):
    """MLM has no options beyond its weight."""


class MaskedLanguageModeling(Objective):
    """MLM objective: cross-entropy over masked text tokens of matched pairs."""
    name = "mlm"
    Config = MLMConfig
    required_keys = ("mlm_labels",)

    def __init__(self, config, options: MLMConfig, encoder):
        super().__init__(config, options)
        c = config
        self.head = MLMHead(c.hidden_size, c.vocab_size, c.hidden_act, c.layer_norm_eps,
                            encoder.embeddings.word_embeddings)
        self.fused = None
        if c.fused_ops:
            from ..backends import require_triton
            require_triton("fused_ops")
            self.fused = FusedMLMLoss()

    def tied_weight_keys(self) -> tuple[str, ...]:
        """The decoder weight is the word-embedding matrix."""
        return ("head.decoder.weight",)

    def loss(self, p: EncoderPass) -> torch.Tensor:
        """Mean cross-entropy over the masked tokens of matched pairs."""
        labels = p.batch["mlm_labels"]
        sel = (labels != -100) & p.matched[:, None]                           # (B, Lt)
        if p.logits is not None:
            full = self.head(p.text)                                         # (B, Lt, V)
            p.logits["mlm_logits"] = full
            return L.cross_entropy_loss(full[sel], labels[sel])
        if self.fused is not None:
            from ..backends import check_launchable
            check_launchable(p.text, "fused_ops")
            h = self.head
            return self.fused(h.transform(p.text[sel]), h.decoder.weight, h.bias, labels[sel])
        return L.cross_entropy_loss(self.head(p.text[sel]), labels[sel])

    def flops(self, batch, config, n_params):
        """The decoder over the masked positions: 6 * H * V per target (the transform is in
        the encoder's parameter count)."""
        n = (batch["mlm_labels"] != -100).sum() if "mlm_labels" in batch else 0
        return 6.0 * config.hidden_size * config.vocab_size * n
