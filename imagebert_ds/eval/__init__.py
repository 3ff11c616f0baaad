"""Evaluation: image-text retrieval (R@K in both directions, Karpathy-split conventions).

* ``retrieval.py`` -- ``recall_at_k`` (ties count against the model) and the cross-encoder pair
  scorer ``itm_row_scores``
* ``evaluate.py`` -- ``evaluate_split``: ``full`` (every pair) and ``two-stage`` (ITC top-k, then
  ITM re-ranking) over ranks, resumable (``partial.py``); ``protocols.py`` -- Flickr30k 1K, COCO
  5K / 1K
* ``data.py`` -- the data settings of a checkpoint's test split; ``cli.py`` -- ``imagebert-ds
  evaluate`` (``--checkpoint`` takes what ``run/resolve.py`` resolves)
* ``scorer.py`` -- ``Scorer`` (``from imagebert_ds import Scorer``)

Docs: docs/evaluation.md.
"""
from __future__ import annotations

import importlib

# lazy attributes: ``imagebert-ds --help`` imports eval.cli without torch
_EXPORTS = {"recall_at_k": "retrieval", "itm_row_scores": "retrieval",
            "itm_score_matrix": "evaluate", "evaluate_split": "evaluate",
            "EvalOptions": "evaluate", "Scorer": "scorer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
