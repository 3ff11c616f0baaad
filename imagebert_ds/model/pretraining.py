"""``ImageBERTForPretraining``: the encoder plus one plug-in per objective (ImageBERT §4.2).

The model runs the encoder once over ``[CLS] text [SEP] | regions`` — the regions flagged in
``region_masked`` read zeros (masking happens here, on the device: the batch carries the original
features once, which are also the MRFR targets) — and hands the result to every
objective it was built with (``PretrainingConfig.objectives``; ``imagebert_ds.model.objectives``): MLM, MOC,
MRFR, ITM (§4.2) and optionally ITC. Masked losses (MLM/MOC/MRFR) count matched pairs only (§4.2:
"masked losses on matched pairs") and only masked, real positions. An objective whose inputs are
absent from the batch is skipped: it is listed in ``out["skipped"]`` and its head joins the graph
with weight 0 (so DeepSpeed/DDP see no unused parameter).

``forward(**batch)`` takes the keys of docs/batch_contract.md (``input_keys()``) and returns
``{"loss", "loss/<name>" for each computed objective, "skipped", + logits when return_logits}``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .config import ImageBERTConfig
from .flops import encoder_flops, image_lengths, non_embedding_params
from .modeling import ImageBERTModel, PretrainedMixin, init_bert_weights, read_bert_state_dict
from .objectives import REGISTRY, EncoderPass, Objective

#: inputs of the shared encoder pass; objectives add their own (``Objective.needs``)
ENCODER_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "region_feats",
                      "region_boxes", "region_mask", "pixel_values")
#: the image-side inputs of each ``visual.mode``
REGION_KEYS = ("region_feats", "region_boxes", "region_mask")
PIXEL_KEYS = ("pixel_values",)
#: every key a batch may carry for the model (docs/batch_contract.md)
MODEL_INPUT_KEYS = ENCODER_INPUT_KEYS + ("mlm_labels", "moc_labels", "moc_probs", "region_masked",
                                         "itm_labels", "image_ids", "cluster_labels",
                                         "cluster_weights")

#: objectives that need detector regions (refused in pixel / patch mode)
REGION_OBJECTIVES = ("moc", "mrfr")
#: Pixel-BERT's pre-training tasks: what a pixel / patch model without objectives runs
PIXEL_DEFAULT_OBJECTIVES = ("mlm", "itm")


@dataclass
class PretrainingConfig(ImageBERTConfig):
    """The architecture plus the objectives the model is pre-trained with (one head each).

    ``objectives`` maps an objective name to its weight or options (``{mlm: 1.0, itc: {weight:
    1.0, embed_dim: 64}}``), parsed into each objective's ``Config`` dataclass; ``None`` means
    ImageBERT's four tasks (MLM, MOC, MRFR, ITM, §4.2), or Pixel-BERT's two (MLM, ITM) for a
    pixel / patch model. ``config.yaml`` of a saved pre-training model holds both.
    """
    objectives: Optional[dict[str, Any]] = None

    def __post_init__(self):
        from .objectives import parse_objectives

        super().__post_init__()
        if self.objectives is None and self.visual.mode != "region":
            self.objectives = dict.fromkeys(PIXEL_DEFAULT_OBJECTIVES, 1.0)
        self.objectives = parse_objectives(self.objectives)
        if self.visual.mode != "region":
            bad = [n for n in REGION_OBJECTIVES if n in self.objectives]
            if bad:
                raise ValueError(f"objectives.{bad[0]} needs detector regions, but visual.mode is "
                                 f"'{self.visual.mode}' (pixel/patch models train mlm, itm, itc)")

    @classmethod
    def of(cls, config: ImageBERTConfig, objectives: Optional[dict] = None) -> "PretrainingConfig":
        """``config``'s architecture with ``objectives`` (a ``PretrainingConfig`` passes as is
        when no objectives are given)."""
        if isinstance(config, cls) and objectives is None:
            return config
        arch = {f.name: getattr(config, f.name) for f in fields(ImageBERTConfig)}
        return cls(**arch, objectives=objectives)


_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size")


class ImageBERTForPretraining(PretrainedMixin, nn.Module):
    """ImageBERT with its objectives' heads; ``forward`` returns the weighted total loss.

    ``self.objectives`` is an ``nn.ModuleDict`` name -> ``Objective`` (heads live there, e.g.
    ``objectives.mlm.head``); only configured objectives have parameters.
    """

    config_class = PretrainingConfig

    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        config = PretrainingConfig.of(config)  # an architecture alone: the default objectives
        self.config = config
        self.bert = ImageBERTModel(config)
        self.objectives = nn.ModuleDict({name: REGISTRY[name](config, opts, self.bert)
                                         for name, opts in config.objectives.items()})
        tied = {id(p) for p in self.bert.parameters()}
        for obj in self.objectives.values():
            for m in obj.modules():
                if not any(id(p) in tied for p in m.parameters(recurse=False)):
                    init_bert_weights(m, config.initializer_range)
        self._n_params = non_embedding_params(self)

    @property
    def tied_weights_keys(self) -> tuple[str, ...]:
        """Names of parameters that are the same tensor as an encoder weight (MLM decoder)."""
        return tuple(f"objectives.{name}.{k}" for name, obj in self.objectives.items()
                     for k in obj.tied_weight_keys())

    def input_keys(self) -> tuple[str, ...]:
        """Batch keys this model reads: the encoder's plus every objective's, and ``itm_labels``
        always (the shared pass reads it: which rows carry their own caption; without an ITM head
        the loader's swapped captions would count as matched pairs for ITC and the masked
        losses)."""
        other = REGION_KEYS if self.config.pixel_input else PIXEL_KEYS
        keys = [k for k in ENCODER_INPUT_KEYS if k not in other] + ["itm_labels"]
        for obj in self.objectives.values():
            keys += [k for k in obj.needs() if k not in keys]
        return tuple(keys)

    def backend(self) -> str:
        """The attention path and fused ops that run (for logs)."""
        return self.bert.backend()

    # --- construction from a BERT checkpoint ---
    @classmethod
    def from_bert(cls, path: str | Path, config: Optional[ImageBERTConfig] = None,
                  **config_overrides) -> "ImageBERTForPretraining":
        """Build from a BERT checkpoint dir. Either pass a full ``config`` (e.g. from
        the shipped ``base`` config, ``registry.list_models()``; its sizes must match the checkpoint's config.json) or let the
        sizes come from config.json and pass ``config_overrides`` (any PretrainingConfig field, e.g.
        ``objectives={...}``, ``attn_impl="sdpa"``). BERT's MLM head (``cls.predictions``) loads
        when the checkpoint has it; other heads and region parameters stay fresh."""
        ckpt_cfg = PretrainingConfig.from_bert_config(path, **config_overrides)
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
        if "mlm" in self.objectives:
            head_state = {k[len("cls.predictions."):]: v for k, v in state.items()
                          if k.startswith("cls.predictions.") and "decoder" not in k}
            if head_state:
                _, unexpected = self.objectives["mlm"].head.load_state_dict(head_state, strict=False)
                report["mlm_head_loaded"] = sorted(head_state.keys() - set(unexpected))
        return report

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each encoder layer in the backward."""
        self.bert.gradient_checkpointing_enable()

    def gradient_checkpointing_disable(self) -> None:
        """Keep every encoder layer's activations."""
        self.bert.gradient_checkpointing_disable()

    def _objective(self, name: str) -> Objective:
        if name not in self.objectives:
            raise RuntimeError(f"this model has no '{name}' objective: add it to objectives")
        return self.objectives[name]

    # --- retrieval encoders and scores ---
    def embed_text(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Text-only pass ``[CLS] text [SEP]`` -> (B, embed_dim) unit-norm ITC embedding."""
        return self._objective("itc").embed_text(self.bert, input_ids, attention_mask, token_type_ids)

    def embed_image(self, region_feats=None, region_boxes=None, region_mask=None,
                    pixel_values=None) -> torch.Tensor:
        """Image-only pass ``[CLS] r_1..r_R`` (or ``[CLS]`` + visual tokens of ``pixel_values``)
        -> (B, embed_dim) unit-norm ITC embedding."""
        return self._objective("itc").embed_image(self.bert, region_feats, region_boxes, region_mask,
                                                  pixel_values=pixel_values)

    def itm_scores(self, input_ids, attention_mask, region_feats=None, region_boxes=None,
                   region_mask=None, token_type_ids=None, as_prob: bool = True,
                   pixel_values=None) -> torch.Tensor:
        """ITM "match" score of each (text, image) pair, (B,): P(match) when ``as_prob``, else the
        log-odds logit[1] - logit[0] (same ranking). Zero-shot retrieval uses this (§5.1)."""
        itm = self._objective("itm")
        h = self.bert(input_ids, attention_mask, token_type_ids, region_feats, region_boxes,
                      region_mask, pixel_values)
        logits = itm.logits(self.bert, h).float()                          # (B, 2)
        return logits.softmax(-1)[:, 1] if as_prob else logits[:, 1] - logits[:, 0]

    def relation_features(self, input_ids, attention_mask, region_feats=None, region_boxes=None,
                          region_mask=None, token_type_ids=None, pixel_values=None,
                          modalities: bool = False) -> torch.Tensor:
        """The image-text relation embedding of each pair: the fused [CLS] output (B, H) of the
        joint pass (what the ``cluster`` head reads, what the trainer clusters and what the
        linear probe classifies); with ``modalities``, the text-only and image-only [CLS]
        outputs concatenated after it, (B, 3H). No masking: pass clean inputs."""
        image = dict(region_feats=region_feats, region_boxes=region_boxes, region_mask=region_mask,
                     pixel_values=pixel_values)
        if self.config.pixel_input:
            image.update(region_feats=None, region_boxes=None, region_mask=None)
        else:
            image["pixel_values"] = None
        joint = self.bert(input_ids, attention_mask, token_type_ids, **image)[:, 0]   # (B, H)
        if not modalities:
            return joint
        text = self.bert(input_ids, attention_mask, token_type_ids)[:, 0]
        return torch.cat([joint, text, self.bert.image_cls(**image)], dim=-1)          # (B, 3H)

    # --- training ---
    def training_flops(self, batch: dict) -> torch.Tensor:
        """Model FLOPs of one forward + backward on ``batch`` (real tokens; model/flops.py), as a
        float64 tensor on the batch's device: no host sync."""
        lens = batch["attention_mask"].sum(1)
        if batch.get("pixel_values" if self.config.pixel_input else "region_feats") is not None:
            lens = lens + image_lengths(batch, self.config, self.training)
        total = encoder_flops(self.config, self._n_params, lens)
        for obj in self.objectives.values():
            if obj.ready(batch):
                total = total + obj.flops(batch, self.config, self._n_params)
        return total

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                return_logits: bool = False, **batch: Optional[torch.Tensor]) -> dict:
        """One encoder pass, then every objective's loss.

        ``input_ids`` (B, Lt), ``attention_mask`` (B, Lt) and the other batch-contract keys
        (``region_feats`` (B, R, D_roi), ``mlm_labels`` ...); unknown keys are an error. Returns
        ``{"loss": weighted sum, "loss/<name>": each computed loss, "skipped": names whose inputs
        were absent}``, plus each objective's full logits with ``return_logits``.
        """
        unknown = set(batch) - set(MODEL_INPUT_KEYS)
        if unknown:
            raise TypeError(f"unexpected batch keys {sorted(unknown)} (model inputs: {MODEL_INPUT_KEYS})")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = {k: v for k, v in batch.items() if v is not None}
        batch.update(input_ids=input_ids, attention_mask=attention_mask)
        p = self._encode(batch, return_logits)
        out: dict = {}
        total = p.hidden.new_zeros((), dtype=torch.float32)
        skipped = []
        for name, obj in self.objectives.items():
            if obj.ready(batch):
                loss = obj.loss(p)
                out[f"loss/{name}"] = loss
                total = total + obj.weight * loss
            else:  # keep the head in the graph with an exact zero contribution
                skipped.append(name)
                total = total + sum(q.sum() for q in obj.parameters()) * 0.0
        out["loss"] = total
        out["skipped"] = tuple(skipped)
        if p.logits is not None:
            out.update(p.logits)
        return out

    def _encode(self, batch: dict, return_logits: bool) -> EncoderPass:
        """The shared encoder pass and the selections every objective uses."""
        input_ids = batch["input_ids"]
        B, Lt = input_ids.shape
        feats, masked = batch.get("region_feats"), batch.get("region_masked")
        if feats is not None and masked is not None:  # MOC/MRFR: the selected regions read zeros
            feats = feats.masked_fill(masked.bool()[..., None], 0)         # (B, R, D_roi)
        pixels = batch.get("pixel_values") if self.config.pixel_input else None
        vfeats = None
        if pixels is not None:  # the CNN runs once per step; every pass reuses its output
            feats, vfeats = None, self.bert.visual_features(pixels)         # VisualFeatures
        hidden = self.bert(input_ids, batch["attention_mask"], batch.get("token_type_ids"),
                           feats, batch.get("region_boxes"), batch.get("region_mask"),
                           visual_features=vfeats)                         # (B, Lt + R, H)
        itm = batch.get("itm_labels")
        matched = itm == 1 if itm is not None else \
            torch.ones(B, dtype=torch.bool, device=input_ids.device)      # (B,)
        targets = None
        if batch.get("region_feats") is not None and batch.get("region_masked") is not None:
            targets = batch["region_masked"].bool() & matched[:, None]   # (B, R)
            if batch.get("region_mask") is not None:
                targets = targets & batch["region_mask"].bool()
        return EncoderPass(encoder=self.bert, batch=batch, hidden=hidden, text=hidden[:, :Lt],
                           regions=hidden[:, Lt:], matched=matched, region_targets=targets,
                           logits={} if return_logits else None, objectives=dict(self.objectives),
                           visual_features=vfeats)
