"""``ImageBERTForPretraining``: the encoder plus the pre-training heads and losses (ImageBERT §4.2).

Tasks (each switched on and weighted by ``config.pretraining``):
  MLM  — predict masked text tokens (``mlm_labels != -100``).
  MOC  — classify masked regions (``region_masked``): CE on ``moc_labels`` or KL to ``moc_probs``.
  MRFR — regress masked regions' original 2048-d features (``mrfr_targets``), MSE.
  ITM  — pooled [CLS] -> match / mismatch (``itm_labels``).
  ITC  — (optional, not in the paper) CLIP-style contrastive loss between a text-only pass
         (``[CLS] text [SEP]``, no regions) and an image-only pass through the same encoder. The
         image-only sequence is ``[CLS] r_1 .. r_R``: one [CLS] word token (position 0, segment 0,
         exactly as the text [CLS]) leading the regions, whose output is the image embedding.
         It uses the ORIGINAL inputs where the batch lets us recover them: text ids
         ``where(mlm_labels != -100, mlm_labels, input_ids)``, region features
         ``where(region_masked, mrfr_targets, region_feats)``; only matched pairs
         (``itm_labels == 1``) are anchors or negatives.
Masked losses (MLM/MOC/MRFR) count matched pairs only (§4.2: "masked losses on matched pairs") and
only masked, real positions. A task whose inputs are absent from the batch is skipped: it is listed
in ``out["skipped"]`` and its head joins the graph with weight 0 (so DDP sees no unused parameter).

``forward(**batch)`` takes the keys of docs/batch_contract.md (``MODEL_INPUT_KEYS``) and returns
``{"loss", "loss/<task>" for each computed task, "skipped", + logits when return_logits=True}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import losses as L
from .attention import kernels_usable_on
from .config import ImageBERTConfig
from .encoder import resolve_fused_ops
from .heads import ITCHead, ITMHead, MLMHead, RegionHead
from .modeling import ImageBERTModel, PretrainedMixin, init_bert_weights, read_bert_state_dict

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mlm_labels", "region_feats",
                    "region_boxes", "region_mask", "moc_labels", "moc_probs", "mrfr_targets",
                    "region_masked", "itm_labels")

_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size")


class ImageBERTForPretraining(PretrainedMixin, nn.Module):
    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.config = config
        c, pt = config, config.pretraining
        self.bert = ImageBERTModel(config)
        H, act, eps = c.hidden_size, c.hidden_act, c.layer_norm_eps
        # heads exist only for enabled tasks: a disabled task has no (unused) parameters
        self.mlm_head = MLMHead(H, c.vocab_size, act, eps, self.bert.embeddings.word_embeddings) \
            if pt.mlm.enabled else None
        self.moc_head = RegionHead(H, c.num_object_classes, act, eps) if pt.moc.enabled else None
        self.mrfr_head = RegionHead(H, c.region_feat_dim, act, eps) if pt.mrfr.enabled else None
        self.itm_head = ITMHead(H, c.hidden_dropout_prob) if pt.itm.enabled else None
        self.itc_head = ITCHead(H, pt.itc.embed_dim, pt.itc.init_temperature,
                                pt.itc.max_logit_scale) if pt.itc.enabled else None
        # fused_ops: MLM decoder + CE in one chunked kernel (no (N, V) logits); torch otherwise
        self.fused_mlm = resolve_fused_ops(c.fused_ops and pt.mlm.enabled, "mlm_loss")
        for head in (self.mlm_head, self.moc_head, self.mrfr_head, self.itm_head, self.itc_head):
            if head is not None:
                for m in head.modules():
                    if not (head is self.mlm_head and m is self.mlm_head.decoder):  # tied: keep
                        init_bert_weights(m, c.initializer_range)

    # --- construction from a BERT checkpoint ---
    @classmethod
    def from_bert(cls, path: str | Path, config: Optional[ImageBERTConfig] = None,
                  **config_overrides) -> "ImageBERTForPretraining":
        """Build from a BERT checkpoint dir. Either pass a full ``config`` (e.g. from
        ``configs/model/base.yaml``; its sizes must match the checkpoint's config.json) or let the
        sizes come from config.json and pass ``config_overrides`` (any ImageBERTConfig field, e.g.
        ``pretraining={...}``, ``attn_impl="sdpa"``). BERT's MLM head (``cls.predictions``) loads
        when the checkpoint has it; other heads and region parameters stay fresh."""
        ckpt_cfg = ImageBERTConfig.from_bert_config(path, **config_overrides)
        if config is None:
            config = ckpt_cfg
        else:
            if config_overrides:
                raise ValueError("pass either config or config_overrides, not both")
            bad = {k: (getattr(config, k), getattr(ckpt_cfg, k)) for k in _SIZE_FIELDS
                   if getattr(config, k) != getattr(ckpt_cfg, k)}
            if bad:
                raise ValueError(f"{path}: config sizes disagree with the checkpoint "
                                 f"(ours, checkpoint's): {bad}")
        model = cls(config)
        model.load_bert(path)
        return model

    def load_bert(self, path: str | Path) -> dict:
        """Load BERT encoder weights (and ``cls.predictions`` into the MLM head when present)."""
        state = read_bert_state_dict(path)
        report = self.bert.load_bert(path, state)
        if self.mlm_head is not None:
            head_state = {k[len("cls.predictions."):]: v for k, v in state.items()
                          if k.startswith("cls.predictions.") and "decoder" not in k}
            if head_state:
                missing, unexpected = self.mlm_head.load_state_dict(head_state, strict=False)
                report["mlm_head_loaded"] = sorted(head_state.keys() - set(unexpected))
        return report

    def gradient_checkpointing_enable(self) -> None:
        self.bert.gradient_checkpointing_enable()

    def gradient_checkpointing_disable(self) -> None:
        self.bert.gradient_checkpointing_disable()

    # --- ITC / retrieval encoders ---
    def embed_text(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Text-only pass ``[CLS] text [SEP]`` -> (B, embed_dim) unit-norm ITC embedding."""
        h = self.bert(input_ids, attention_mask, token_type_ids)           # (B, Lt, H)
        return self.itc_head.text(h[:, 0])

    def embed_image(self, region_feats, region_boxes, region_mask=None) -> torch.Tensor:
        """Image-only pass ``[CLS] r_1..r_R`` -> (B, embed_dim) unit-norm ITC embedding."""
        B = region_feats.shape[0]
        cls_ids = torch.full((B, 1), self.config.cls_token_id, dtype=torch.long,
                             device=region_feats.device)
        h = self.bert(cls_ids, torch.ones_like(cls_ids), None, region_feats, region_boxes,
                      region_mask)                                         # (B, 1 + R, H)
        return self.itc_head.image(h[:, 0])

    def itm_scores(self, input_ids, attention_mask, region_feats, region_boxes, region_mask=None,
                   token_type_ids=None, as_prob: bool = True) -> torch.Tensor:
        """ITM "match" score of each (text, regions) pair, (B,): P(match) when ``as_prob``, else the
        log-odds logit[1] - logit[0] (same ranking). Zero-shot retrieval uses this (§5.1)."""
        if self.itm_head is None:
            raise RuntimeError("itm_scores needs the ITM head: set pretraining.itm.enabled=true")
        h = self.bert(input_ids, attention_mask, token_type_ids, region_feats, region_boxes, region_mask)
        logits = self.itm_head(self.bert.pool(h)).float()                  # (B, 2)
        return logits.softmax(-1)[:, 1] if as_prob else logits[:, 1] - logits[:, 0]

    # --- training forward ---
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None,
                mlm_labels: Optional[torch.Tensor] = None,
                region_feats: Optional[torch.Tensor] = None,
                region_boxes: Optional[torch.Tensor] = None,
                region_mask: Optional[torch.Tensor] = None,
                moc_labels: Optional[torch.Tensor] = None,
                moc_probs: Optional[torch.Tensor] = None,
                mrfr_targets: Optional[torch.Tensor] = None,
                region_masked: Optional[torch.Tensor] = None,
                itm_labels: Optional[torch.Tensor] = None,
                return_logits: bool = False) -> dict:
        pt = self.config.pretraining
        B, Lt = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids, attention_mask, token_type_ids, region_feats, region_boxes,
                           region_mask)                                    # (B, Lt + R, H)
        text_h, reg_h = hidden[:, :Lt], hidden[:, Lt:]                     # (B, Lt, H), (B, R, H)
        matched = (itm_labels == 1) if itm_labels is not None else \
            torch.ones(B, dtype=torch.bool, device=input_ids.device)      # (B,)
        out: dict = {}
        losses: dict[str, torch.Tensor] = {}
        skipped: list[str] = []

        def head_on(head, h, sel, key):
            """Head outputs at the selected positions; full logits stored when asked."""
            if return_logits:
                full = head(h)
                out[key] = full
                return full[sel]
            return head(h[sel])

        # regions that carry MOC/MRFR targets: masked, real, in a matched pair
        reg_sel = None
        if region_feats is not None:
            if region_masked is not None:
                reg_sel = region_masked.bool()
            elif moc_labels is not None:
                reg_sel = moc_labels != -100
            if reg_sel is not None:
                if region_mask is not None:
                    reg_sel = reg_sel & region_mask.bool()
                reg_sel = reg_sel & matched[:, None]                          # (B, R)

        if pt.mlm.enabled:
            if mlm_labels is None:
                skipped.append("mlm")
            else:
                sel = (mlm_labels != -100) & matched[:, None]                  # (B, Lt)
                if self.fused_mlm is not None and not return_logits and kernels_usable_on(text_h):
                    losses["mlm"] = self.fused_mlm(self.mlm_head.transform(text_h[sel]),
                                                   self.mlm_head.decoder.weight, self.mlm_head.bias,
                                                   mlm_labels[sel])
                else:
                    losses["mlm"] = L.cross_entropy_loss(
                        head_on(self.mlm_head, text_h, sel, "mlm_logits"), mlm_labels[sel])

        if pt.moc.enabled:
            kl = pt.moc.variant == "kl"
            if reg_sel is None or (moc_probs is None if kl else moc_labels is None):
                skipped.append("moc")
            else:
                sel = reg_sel if kl else reg_sel & (moc_labels != -100)
                logits = head_on(self.moc_head, reg_h, sel, "moc_logits")      # (N, C)
                losses["moc"] = L.kl_loss(logits, moc_probs[sel]) if kl else \
                    L.cross_entropy_loss(logits, moc_labels[sel])

        if pt.mrfr.enabled:
            if reg_sel is None or mrfr_targets is None:
                skipped.append("mrfr")
            else:
                pred = head_on(self.mrfr_head, reg_h, reg_sel, "mrfr_pred")    # (N, D_roi)
                losses["mrfr"] = L.mse_loss(pred, mrfr_targets[reg_sel])

        if pt.itm.enabled:
            if itm_labels is None:
                skipped.append("itm")
            else:
                logits = self.itm_head(self.bert.pool(hidden))                 # (B, 2)
                if return_logits:
                    out["itm_logits"] = logits
                losses["itm"] = L.cross_entropy_loss(logits, itm_labels)

        if pt.itc.enabled:
            if region_feats is None:
                skipped.append("itc")
            else:
                ids = input_ids if mlm_labels is None else \
                    torch.where(mlm_labels != -100, mlm_labels, input_ids)
                feats = region_feats
                if mrfr_targets is not None and region_masked is not None:
                    feats = torch.where(region_masked.bool()[..., None], mrfr_targets.to(feats.dtype), feats)
                txt = self.embed_text(ids, attention_mask, token_type_ids)     # (B, E)
                img = self.embed_image(feats, region_boxes, region_mask)       # (B, E)
                res = L.itc_loss(img, txt, self.itc_head.scale(), matched, return_logits)
                if return_logits:
                    losses["itc"], out["itc_logits"] = res
                else:
                    losses["itc"] = res

        total = hidden.new_zeros((), dtype=torch.float32)
        for name, value in losses.items():
            total = total + getattr(pt, name).weight * value
            out[f"loss/{name}"] = value
        for name in skipped:  # keep the skipped head in the graph (exact zero contribution)
            head = getattr(self, f"{name}_head")
            total = total + sum(p.sum() for p in head.parameters()) * 0.0
        out["loss"] = total
        out["skipped"] = tuple(skipped)
        return out
