"""``ImageBERTModel``: one BERT encoder over ``[CLS] text [SEP] | regions`` (ImageBERT §3, Fig. 1).

    hidden = model(input_ids, attention_mask, token_type_ids=None,
                   region_feats=None, region_boxes=None, region_mask=None)   # (B, Lt + R, H)

Positions ``[:, :Lt]`` are the text tokens (``[:, 0]`` is [CLS]), ``[:, Lt:]`` the R region slots.
Text and region padding masks are concatenated into one key-padding mask (B, Lt + R). Without
regions the model is exactly BERT (L = Lt), which ``from_bert`` relies on: weights of a transformers
``BertModel`` checkpoint load 1:1 (§3.1: "initialized from a pre-trained BERT"); region parameters
stay freshly initialised.

Save/load: ``save_pretrained(dir)`` writes ``config.yaml`` + ``model.safetensors`` (via
``safetensors.torch.save_model``, which de-duplicates tied weights); ``from_pretrained(dir)``
restores exactly.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from imagebert_ds.kernels.modules import FusedAddLayerNorm

from .config import ImageBERTConfig
from .embeddings import Embeddings
from .encoder import Encoder

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"


# ---------------------------------------------------------------------------------------------
# BERT checkpoint reading
# ---------------------------------------------------------------------------------------------
def read_bert_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a BERT checkpoint dir (model.safetensors, sharded safetensors, or
    pytorch_model.bin), with names normalised: ``bert.`` prefix stripped, ``gamma/beta`` ->
    ``weight/bias``. ``cls.*`` (pre-training heads) are kept as is."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = [path / f for f in sorted(set(index["weight_map"].values()))]
    elif (path / "pytorch_model.bin").is_file():
        files = [path / "pytorch_model.bin"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors / pytorch_model.bin BERT weights")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file
            raw.update(load_file(str(f)))
        else:
            raw.update(torch.load(f, map_location="cpu", weights_only=True))
    out = {}
    for k, v in raw.items():
        if k.startswith("bert."):
            k = k[len("bert."):]
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v
    return out


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's init: N(0, std) for Linear/Embedding weights, zero biases, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
    elif isinstance(module, (nn.LayerNorm, FusedAddLayerNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for modules built from an ``ImageBERTConfig``
    (``config_class``: the config class ``from_pretrained`` reads)."""
    config: ImageBERTConfig
    config_class = ImageBERTConfig

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.yaml`` + ``model.safetensors`` into ``directory``."""
        from safetensors.torch import save_model
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.config.save_yaml(d / CONFIG_NAME)
        save_model(self, str(d / WEIGHTS_NAME))  # drops duplicate (tied) tensors itself

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        overrides: Optional[list[str]] = None):
        """Rebuild from ``save_pretrained`` output; ``overrides`` are ``key=value`` strings for
        implementation switches (e.g. ``["attn_impl=sdpa"]`` to evaluate a Triton-trained model
        where Triton cannot run)."""
        from safetensors.torch import load_model

        from imagebert_ds.config_utils import apply_overrides, from_dict, load_yaml
        d = Path(directory)
        data = load_yaml(d / CONFIG_NAME)
        if cls.config_class is ImageBERTConfig:  # a pre-training model's config: its encoder's
            data.pop("objectives", None)
        apply_overrides(data, list(overrides or []))
        model = cls(from_dict(cls.config_class, data, source=str(d / CONFIG_NAME)))
        load_model(model, str(d / WEIGHTS_NAME), strict=True, device=str(map_location))
        return model


class Pooler(nn.Module):
    """BERT pooler: tanh(W h_[CLS]) — used by ITM (§4.2 task 4)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, H)
        """(B, L, H) -> (B, H)."""
        return torch.tanh(self.dense(hidden[:, 0]))


class ImageBERTModel(PretrainedMixin, nn.Module):
    """The ImageBERT encoder: text + region embeddings, the Transformer, BERT's pooler."""

    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config.hidden_size)
        self.apply(lambda m: init_bert_weights(m, config.initializer_range))
        emb, std = self.embeddings, config.initializer_range
        if config.pixel_input:  # (init_bert_weights leaves the CNN's convs / BatchNorms as
            nn.init.normal_(emb.visual.semantic, std=std)   # torchvision built or loaded them)
            return
        nn.init.normal_(emb.region_position, std=std)
        # Masked regions arrive with zeroed features (and padded slots with zero boxes): with a zero
        # bias the projection's output is an all-zero vector, whose LayerNorm has zero variance and
        # multiplies gradients by 1/sqrt(eps) = 1e6. A N(0, std) bias keeps that input non-constant.
        nn.init.normal_(emb.region_feat_proj.bias, std=std)
        nn.init.normal_(emb.region_loc_proj.bias, std=std)

    # --- toggles used by the trainer ---
    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer in the backward (activation checkpointing)."""
        self.encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """Keep every layer's activations (the default)."""
        self.encoder.gradient_checkpointing = False

    def set_attn_impl(self, impl: str) -> None:
        """Switch the attention backend of every layer (and the config that records it)."""
        self.encoder.set_attn_impl(impl)
        self.config.attn_impl = impl

    def backend(self) -> str:
        """The attention path and fused ops that run, for logs (``metrics.jsonl``, W&B)."""
        fused = "fused add+LayerNorm / MLM loss" if self.config.fused_ops else "torch ops"
        return f"{self.encoder.backend()}, {fused}"

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None,
                region_feats: Optional[torch.Tensor] = None,
                region_boxes: Optional[torch.Tensor] = None,
                region_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None,
                visual_features=None) -> torch.Tensor:
        """input_ids (B, Lt); attention_mask (B, Lt) 1 = real; region_feats (B, R, 2048);
        region_boxes (B, R, 5) (zeros when None); region_mask (B, R) 1 = real (all real when None);
        or, in pixel/patch mode, pixel_values (B, 3, S, S) -> V visual tokens (visual.py; cells
        of padding masked), or instead their ``visual_features(pixel_values)``, computed once and
        shared by the passes of a training step (the CNN is most of a pixel model's step).
        Returns the last hidden states (B, Lt + R, H) (R = 0 without regions or pixels)."""
        B, Lt = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embeddings.text(input_ids, token_type_ids)              # (B, Lt, H)
        mask = attention_mask.bool()                                     # (B, Lt)
        if pixel_values is not None or visual_features is not None:
            v, real = self.embeddings.pixels(pixel_values, visual_features)  # (B, V, H), (B, V)
            x = torch.cat([x, v], dim=1)
            mask = torch.cat([mask, real], dim=1)
        elif region_feats is not None:
            R = region_feats.shape[1]
            if region_boxes is None:
                region_boxes = region_feats.new_zeros(B, R, self.config.region_loc_dim)
            if region_mask is None:
                region_mask = torch.ones(B, R, dtype=torch.bool, device=region_feats.device)
            if region_mask.shape != (B, R):
                raise ValueError(f"region_mask must be (B, R) = {(B, R)}, got {tuple(region_mask.shape)}")
            r = self.embeddings.regions(region_feats, region_boxes)      # (B, R, H)
            x = torch.cat([x, r], dim=1)                                 # (B, Lt + R, H)
            mask = torch.cat([mask, region_mask.bool()], dim=1)          # (B, Lt + R)
        return self.encoder(x, mask)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, H): tanh(W h_0), BERT's pooled [CLS]."""
        return self.pooler(hidden)

    def image_cls(self, region_feats=None, region_boxes=None, region_mask=None,
                  pixel_values=None, visual_features=None) -> torch.Tensor:
        """The [CLS] output (B, H) of the image-only pass ``[CLS] r_1..r_R`` (or ``[CLS]`` + the
        visual tokens of ``pixel_values`` / their ``visual_features``): one [CLS] word token,
        position 0 / segment 0 exactly as the text's, leading the image."""
        image = next(t for t in (pixel_values, region_feats) if t is not None) \
            if visual_features is None else visual_features.map
        cls_ids = torch.full((image.shape[0], 1), self.config.cls_token_id, dtype=torch.long,
                             device=image.device)
        h = self(cls_ids, torch.ones_like(cls_ids), None, region_feats, region_boxes,
                 region_mask, pixel_values, visual_features)                 # (B, 1 + R, H)
        return h[:, 0]

    def visual_features(self, pixel_values: torch.Tensor):
        """(B, 3, S, S) -> ``VisualFeatures``: the visual module's projected feature map (the CNN
        / patch embedding; (B, h, w, H), before position embeddings and sampling) and its
        padding mask (pixel / patch mode)."""
        if not self.config.pixel_input:
            raise ValueError("visual_features: this model's visual.mode is 'region'")
        return self.embeddings.visual.features(pixel_values)

    # --- BERT initialisation ---
    @classmethod
    def from_bert(cls, path: str | Path, **config_overrides) -> "ImageBERTModel":
        """Sizes from ``path/config.json``, BERT weights from ``path``; region parts fresh.
        ``config_overrides``: any ``ImageBERTConfig`` field (e.g. ``max_regions=36``)."""
        config = ImageBERTConfig.from_bert_config(path, **config_overrides)
        model = cls(config)
        model.load_bert(path)
        return model

    def load_bert(self, path: str | Path, state: Optional[dict] = None) -> dict:
        """Copy BERT weights (embeddings, encoder, pooler) from a checkpoint dir into this model.
        Raises on a size mismatch (naming the tensor); returns {'loaded', 'missing', 'ignored'}
        lists of names. Region parameters are expected to be missing."""
        state = read_bert_state_dict(path) if state is None else state
        own = self.state_dict()
        loaded, ignored = [], []
        with torch.no_grad():
            for k, v in state.items():
                if k not in own:
                    ignored.append(k)
                    continue
                if own[k].shape != v.shape:
                    raise ValueError(f"{path}: tensor '{k}' has shape {tuple(v.shape)}, the model "
                                     f"expects {tuple(own[k].shape)} (config sizes disagree?)")
                own[k].copy_(v)
                loaded.append(k)
        missing = [k for k in own if k not in state]
        bert_missing = [k for k in missing if ".region_" not in k and not k.startswith("embeddings.region_")]
        if bert_missing:
            log.warning("%s: BERT tensors not in the checkpoint (left freshly initialised): %s",
                        path, bert_missing)
        return {"loaded": loaded, "missing": missing, "ignored": ignored}
