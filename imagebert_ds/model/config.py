"""Typed architecture config for ImageBERT (Qi et al. 2020, §3).

``ImageBERTConfig`` holds the Transformer sizes (BERT's names, so a BERT ``config.json`` maps onto
it), the region-embedding sizes (§3.2: 2048-d RoI feature, 5-d location), the visual input and the
implementation switches: what the encoder is built from. The pre-training objectives are not
architecture: ``pretraining.PretrainingConfig`` adds them. YAML loads strictly through
``config_utils``: an unknown key is an error naming the key and the file; value checks live in
``__post_init__``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from imagebert_ds.config_utils import ConfigError, apply_overrides, from_dict, load_yaml, to_dict

HiddenAct = Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]
ATTN_IMPLS = ("eager", "sdpa", "triton")


@dataclass
class VisualConfig:
    """What the image side is made of (``imagebert_ds.model.visual``): ``region`` = detector RoI
    features (ImageBERT), ``pixel`` = a ResNet feature map (Pixel-BERT), ``patch`` = linear patches
    (ViLT). The other keys apply to pixel/patch."""
    mode: Literal["region", "pixel", "patch"] = "region"
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    backbone_stages: int = 4  # ResNet stages kept: feature stride 4 * 2^(n-1) (32 for all 4)
    backbone_weights: Optional[str] = None  # a local torchvision state_dict; None = random init
    backbone_lr_mult: float = 1.0  # the backbone's LR relative to the run's
    freeze_backbone_steps: int = 0  # the backbone's LR is 0 for the first N steps of each stage
    patch_size: int = 16  # patch mode
    sample_pixels: int = 100  # random feature-map positions kept per image in training; 0 = all
    max_grid: int = 64  # rows / columns of the 2-D position tables

    def __post_init__(self):
        if not 1 <= self.backbone_stages <= 4:
            raise ValueError(f"visual.backbone_stages must be 1..4, got {self.backbone_stages}")
        for k in ("patch_size", "max_grid"):
            if getattr(self, k) < 1:
                raise ValueError(f"visual.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("sample_pixels", "freeze_backbone_steps"):
            if getattr(self, k) < 0:
                raise ValueError(f"visual.{k} must be >= 0, got {getattr(self, k)}")
        if self.backbone_lr_mult < 0:
            raise ValueError(f"visual.backbone_lr_mult must be >= 0, got {self.backbone_lr_mult}")
        if self.backbone_weights and not Path(self.backbone_weights).is_file():
            raise ValueError(f"visual.backbone_weights: {self.backbone_weights} is not a file "
                             "(a torchvision state_dict; weights are never downloaded)")


@dataclass
class ImageBERTConfig:
    """Architecture and implementation switches of one ImageBERT encoder (field names follow
    BERT's ``config.json`` where one exists)."""
    # --- Transformer (BERT names and defaults: BERT-base uncased) ---
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: HiddenAct = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    # special tokens of the BERT uncased vocab (checked against the data's tokenizer in a run)
    cls_token_id: int = 101  # [CLS]; also leads the ITC image-only sequence
    sep_token_id: int = 102  # [SEP]
    mask_token_id: int = 103  # [MASK]
    # --- Regions (§3.2) ---
    region_feat_dim: int = 2048
    region_loc_dim: int = 5
    num_object_classes: int = 1601  # Visual Genome: 1600 classes + background
    max_regions: int = 100
    # --- Visual input: regions (ImageBERT) or pixels (Pixel-BERT) / patches ---
    visual: VisualConfig = field(default_factory=VisualConfig)
    # --- Implementation ---
    attn_impl: Literal["eager", "sdpa", "triton"] = "sdpa"  # the attention backend (no fallback)
    fused_ops: bool = False  # Triton add+LayerNorm and fused MLM decoder + CE

    def __post_init__(self):
        pos = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
               "num_layers": self.num_layers, "num_heads": self.num_heads,
               "intermediate_size": self.intermediate_size,
               "max_position_embeddings": self.max_position_embeddings,
               "region_feat_dim": self.region_feat_dim, "region_loc_dim": self.region_loc_dim,
               "num_object_classes": self.num_object_classes, "max_regions": self.max_regions}
        for k, v in pos.items():
            if v <= 0:
                raise ValueError(f"{k} must be > 0, got {v}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads}); divisors of {self.hidden_size} near it: "
                             f"{sorted((d for d in range(1, self.hidden_size + 1) if self.hidden_size % d == 0), key=lambda d: abs(d - self.num_heads))[:3]}")
        if self.type_vocab_size < 2:
            raise ValueError(f"type_vocab_size must be >= 2 (segment 1 marks regions), got "
                             f"{self.type_vocab_size}")
        for k in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, k)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{k} must be in [0, 1), got {p}")
        if self.layer_norm_eps <= 0 or self.initializer_range <= 0:
            raise ValueError("layer_norm_eps and initializer_range must be > 0")
        for k in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
            if not 0 <= getattr(self, k) < self.vocab_size:
                raise ValueError(f"{k} ({getattr(self, k)}) must be in [0, vocab_size={self.vocab_size})")
        if self.attn_impl == "triton":
            from imagebert_ds.kernels import attention_unsupported

            reason = attention_unsupported(self.hidden_size // self.num_heads)
            if reason is not None:
                raise ValueError(f"attn_impl 'triton' cannot run this model (hidden_size "
                                 f"{self.hidden_size} / num_heads {self.num_heads}): {reason}")
        if isinstance(self.visual, dict):
            self.visual = from_dict(VisualConfig, self.visual, prefix="visual.")

    @property
    def pixel_input(self) -> bool:
        """True when the image side is pixels (``visual.mode`` pixel or patch)."""
        return self.visual.mode != "region"

    # --- loading / saving ---
    @classmethod
    def from_dict(cls, data: dict, source: str = "<config>") -> "ImageBERTConfig":
        """Strict build from plain data; errors name the key and ``source``."""
        return from_dict(cls, data, source=source)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Optional[list[str]] = None) -> "ImageBERTConfig":
        """Strict load of a YAML file or a shipped config's name (``registry.list_models()``);
        ``overrides`` are ``a.b=value`` strings (same as ``--set``)."""
        from imagebert_ds.model.registry import resolve_model_config

        path = resolve_model_config(str(path))
        data = load_yaml(path)
        if overrides:
            apply_overrides(data, overrides)
        return from_dict(cls, data, source=str(path))

    def to_dict(self) -> dict:
        """Plain data, as written to config.yaml."""
        return to_dict(self)

    def save_yaml(self, path: str | Path) -> None:
        """Write ``to_dict()`` as YAML (``from_yaml`` reads it back exactly)."""
        import yaml
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_bert_config(cls, path: str | Path, **overrides) -> "ImageBERTConfig":
        """Sizes from a transformers BERT ``config.json`` (file or directory), plus ``overrides``
        (any field of this config class)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: BERT config.json not found")
        hf = json.loads(path.read_text())
        mt = hf.get("model_type", "bert")
        if mt not in ("bert",):
            raise ConfigError(f"{path}: model_type '{mt}' is not a BERT checkpoint")
        pe = hf.get("position_embedding_type", "absolute")
        if pe != "absolute":
            raise ConfigError(f"{path}: position_embedding_type '{pe}' unsupported (absolute only)")
        names = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
                 "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                 "intermediate_size": "intermediate_size", "hidden_act": "hidden_act",
                 "hidden_dropout_prob": "hidden_dropout_prob",
                 "attention_probs_dropout_prob": "attention_probs_dropout_prob",
                 "max_position_embeddings": "max_position_embeddings",
                 "type_vocab_size": "type_vocab_size", "layer_norm_eps": "layer_norm_eps",
                 "initializer_range": "initializer_range", "pad_token_id": "pad_token_id"}
        data = {ours: hf[theirs] for theirs, ours in names.items() if theirs in hf}
        data.update(to_dict(overrides))
        return from_dict(cls, data, source=f"{path} (+ overrides)")
