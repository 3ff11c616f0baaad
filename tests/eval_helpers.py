"""Shared pieces of the retrieval-evaluation tests: a tiny toy test split and a tiny randomly
initialised model (ITM + ITC heads) saved with ``save_pretrained``."""
from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MAX_REGIONS = 4  # toy scenes hold 1-3 shapes
MAX_TEXT_LEN = 32


def make_split_dir(root: Path, images: int = 12) -> Path:
    """A toy test split of ``images`` scenes x 5 captions; returns its directory."""
    from imagebert_ds.data.toy import make_toy_data

    make_toy_data(root, train=2, test=images, seed=5)
    return root / "test"


def data_config():
    """The DataConfig that reads the toy split (the toy run's settings)."""
    from imagebert_ds.data import DataConfig

    return DataConfig(max_text_len=MAX_TEXT_LEN, max_regions=MAX_REGIONS)


def tiny_model(objectives: str = "{itm: 1.0, itc: {embed_dim: 16}}", seed: int = 0):
    """A 1-layer tiny ImageBERT with ITM (+ ITC) heads, random weights, eval mode."""
    from imagebert_ds.model import PretrainingConfig, ImageBERTForPretraining

    cfg = PretrainingConfig.from_yaml("tiny",
                                    [f"objectives={objectives}", "num_layers=1",
                                     f"max_regions={MAX_REGIONS}", "hidden_dropout_prob=0.0",
                                     "attention_probs_dropout_prob=0.0"])
    torch.manual_seed(seed)
    return ImageBERTForPretraining(cfg).eval()


def make_model_dir(root: Path, **kw) -> Path:
    """``tiny_model(**kw)`` saved with ``save_pretrained`` under ``root``."""
    model = tiny_model(**kw)
    model.save_pretrained(root)
    return root


def one_thread():
    """Context for a test module: tiny shapes run as fast on one thread, and do not slow down
    tenfold when another process holds the second core (the thread pool's barriers)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)
    return ctx()
