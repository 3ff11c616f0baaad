"""Typed model config for ImageBERT (Qi et al. 2020, §3: model; §4: pre-training tasks).

``ImageBERTConfig`` holds the Transformer sizes (BERT's names, so a BERT ``config.json`` maps onto
it), the region-embedding sizes (§3.2: 2048-d RoI feature, 5-d location) and a nested
``pretraining`` section switching and weighting each task (MLM, MOC, MRFR, ITM from §4.2, plus an
optional image-text contrastive task, ITC). YAML loads strictly through ``config_utils``: an unknown
key is an error naming the key and the file; value checks live in ``__post_init__``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

from imagebert_ds.config_utils import ConfigError, apply_overrides, from_dict, load_yaml, to_dict

HiddenAct = Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]


def _check_weight(name: str, w: float) -> None:
    if w < 0:
        raise ValueError(f"pretraining.{name}.weight must be >= 0, got {w}")


@dataclass
class TaskConfig:
    """One pre-training task: on/off and its weight in the total loss."""
    enabled: bool = True
    weight: float = 1.0


@dataclass
class MOCConfig:
    """Masked Object Classification (§4.2 task 2). ``ce``: cross-entropy on the detector's label;
    ``kl``: KL(detector distribution || predicted distribution), needs ``moc_probs`` in the batch."""
    enabled: bool = True
    weight: float = 1.0
    variant: Literal["ce", "kl"] = "ce"


@dataclass
class ITCConfig:
    """Image-text contrastive (not in ImageBERT; CLIP-style InfoNCE, cf. the ITR framework's
    multimodal contrastive learning). Temperature is learned as ``logit_scale = log(1/T)`` and
    clamped to ``[0, log(max_logit_scale)]`` like CLIP (max 100)."""
    enabled: bool = False
    weight: float = 1.0
    embed_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def __post_init__(self):
        if self.embed_dim <= 0:
            raise ValueError(f"pretraining.itc.embed_dim must be > 0, got {self.embed_dim}")
        if not 0 < self.init_temperature:
            raise ValueError(f"pretraining.itc.init_temperature must be > 0, got {self.init_temperature}")
        if self.max_logit_scale < 1.0 / self.init_temperature:
            raise ValueError(f"pretraining.itc.max_logit_scale ({self.max_logit_scale}) must be >= "
                             f"1/init_temperature ({1.0 / self.init_temperature:.3g})")


@dataclass
class PretrainingConfig:
    mlm: TaskConfig = field(default_factory=TaskConfig)
    moc: MOCConfig = field(default_factory=MOCConfig)
    mrfr: TaskConfig = field(default_factory=TaskConfig)
    itm: TaskConfig = field(default_factory=TaskConfig)
    itc: ITCConfig = field(default_factory=ITCConfig)

    TASKS = ("mlm", "moc", "mrfr", "itm", "itc")

    def __post_init__(self):
        for name in self.TASKS:
            _check_weight(name, getattr(self, name).weight)

    def enabled_tasks(self) -> list[str]:
        return [t for t in self.TASKS if getattr(self, t).enabled]


@dataclass
class ImageBERTConfig:
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
    cls_token_id: int = 101  # [CLS] in the BERT uncased vocab; leads the ITC image-only sequence
    # --- Regions (§3.2) ---
    region_feat_dim: int = 2048
    region_loc_dim: int = 5
    num_object_classes: int = 1601  # Visual Genome: 1600 classes + background
    max_regions: int = 100
    # --- Implementation ---
    attn_impl: Literal["eager", "sdpa", "triton"] = "sdpa"
    fused_ops: bool = False
    # --- Pre-training objectives (§4.2) ---
    pretraining: PretrainingConfig = field(default_factory=PretrainingConfig)

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
        for k in ("pad_token_id", "cls_token_id"):
            if not 0 <= getattr(self, k) < self.vocab_size:
                raise ValueError(f"{k} ({getattr(self, k)}) must be in [0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    # --- loading / saving ---
    @classmethod
    def from_dict(cls, data: dict, source: str = "<config>") -> "ImageBERTConfig":
        return from_dict(cls, data, source=source)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Optional[list[str]] = None) -> "ImageBERTConfig":
        """Strict load; ``overrides`` are ``a.b=value`` strings (same as ``--set``)."""
        data = load_yaml(path)
        if overrides:
            apply_overrides(data, overrides)
        return from_dict(cls, data, source=str(path))

    def to_dict(self) -> dict:
        return to_dict(self)

    def save_yaml(self, path: str | Path) -> None:
        import yaml
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes) -> "ImageBERTConfig":
        return replace(self, **changes)

    @classmethod
    def from_bert_config(cls, path: str | Path, **overrides) -> "ImageBERTConfig":
        """Sizes from a transformers BERT ``config.json`` (file or directory), plus ``overrides``
        (any ImageBERTConfig field; ``pretraining`` may be a dict or a PretrainingConfig)."""
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
        if isinstance(overrides.get("pretraining"), PretrainingConfig):
            overrides["pretraining"] = to_dict(overrides["pretraining"])
        data.update(overrides)
        return from_dict(cls, data, source=f"{path} (+ overrides)")
