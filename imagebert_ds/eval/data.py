"""The data settings that read a test split for a checkpoint's model, and the split's identity."""
from __future__ import annotations

import os
from pathlib import Path

from imagebert_ds.config_utils import ConfigError, from_dict
from imagebert_ds.run.resolve import RunCheckpoint


def eval_data_config(ck: RunCheckpoint, model_config, tokenizer: str | None = None,
                     max_text_len: int | None = None, max_regions: int | None = None):
    """The ``DataConfig`` that reads a test split for this model: the run's data settings when
    the checkpoint is in a run, else the MiniLM tokenizer, ``max_text_len`` 40 and the model's
    ``max_regions``; explicit arguments win."""
    from imagebert_ds.data import DataConfig

    data: dict = {}
    source = "evaluate defaults"
    if ck.run_cfg is not None:
        data = dict(ck.run_cfg.data)
        source = str(ck.run_cfg.path)
    data.setdefault("region_feat_dim", model_config.region_feat_dim)
    if ck.run_cfg is None:
        data["max_regions"] = model_config.max_regions
        data["max_text_len"] = min(40, model_config.max_position_embeddings)
    for key, value in (("tokenizer", tokenizer), ("max_text_len", max_text_len),
                       ("max_regions", max_regions)):
        if value is not None:
            data[key] = value
    pixels = bool(getattr(model_config, "pixel_input", False))  # Pixel-BERT reads the .jpg
    data.update(use_regions=not pixels, use_images=pixels)
    cfg = from_dict(DataConfig, data, source=source)
    if cfg.max_text_len > model_config.max_position_embeddings:
        raise ConfigError(f"max_text_len {cfg.max_text_len} exceeds the model's "
                          f"max_position_embeddings ({model_config.max_position_embeddings})")
    return cfg


def split_fingerprint(path: str | os.PathLike) -> dict:
    """Identity of a split's shards for resume checks (names, sizes, mtimes)."""
    from imagebert_ds.data.shards import list_shards

    shards = list_shards(path)
    return {"split": str(Path(path).resolve()),
            "shards": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in shards]}
