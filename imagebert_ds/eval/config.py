"""``EvalConfig``: the zero-shot retrieval a pre-training run ends with (``evaluate.py``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class EvalConfig:
    """Zero-shot retrieval after the last stage (``imagebert_ds.eval.evaluate``)."""
    # A retrieval split directory (Karpathy-style test shards); null = no evaluation.
    retrieval_split: Optional[str] = None
    batch_size: int = 512
    max_images: Optional[int] = None
    # two-stage: ITC top-k candidates re-ranked by ITM (needs itc in the last stage); full: ITM
    # on every pair; auto: two-stage when the last stage trains itc, else full.
    mode: Literal["auto", "two-stage", "full"] = "auto"
    k: Optional[int] = None  # two-stage candidates per query; null = 128
    also_full: bool = False  # with two-stage, also score every pair (small splits: the toy test)
    # two-stage: the top-k score ITM's match log-odds (itm), or that + the ITC cosine (itm+itc,
    # BLIP's re-ranking; the ITM-only recalls are reported beside it)
    rerank: Literal["itm", "itm+itc"] = "itm"

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise ValueError(f"eval.k must be >= 1, got {self.k}")
