"""Data: WebDataset shards, DALI loaders, the pre-training collator, retrieval eval data.

Public API (lazy attributes, so ``import imagebert_ds.data`` stays light; torch/DALI load on use):

* ``DataConfig``, ``SourceConfig``, ``default_tokenizer_path``, ``load_tokenizer`` (config.py)
* ``build_pretrain_loader(cfg, rank, world_size, device="cpu") -> PretrainLoader`` (loader.py)
* ``load_retrieval_split(path, cfg) -> RetrievalSplit`` (retrieval_split.py)
* ``PretrainCollator``, ``Sample`` (collator.py); ``make_toy_data`` (toy.py)

Shard format and commands: docs/data.md.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "config", "SourceConfig": "config",
    "default_tokenizer_path": "config", "load_tokenizer": "config",
    "build_pretrain_loader": "loader", "PretrainLoader": "loader",
    "load_retrieval_split": "retrieval_split", "RetrievalSplit": "retrieval_split",
    "PretrainCollator": "collator", "Sample": "collator", "make_toy_data": "toy",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
