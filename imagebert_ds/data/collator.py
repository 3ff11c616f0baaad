"""The pre-training collator: samples -> the model's batch (docs/batch_contract.md).

Plain numpy/torch, no DALI, so it is tested on its own. Follows ImageBERT (Qi et al. 2020,
sec. 3.3):

* ITM: with probability ``itm_neg_prob`` a sample's caption is replaced by the caption of another
  sample in the batch whose ``image_id`` differs (never the own image's); ``itm_labels`` 1 / 0.
* MLM: 15% of real text tokens (never [CLS]/[SEP]/[PAD]) are selected; 80% -> [MASK], 10% -> a
  random non-special token, 10% kept; ``mlm_labels`` holds the original id there, -100 elsewhere.
* Regions: padded / truncated to ``max_regions``, features kept in ``region_dtype`` (float16 by
  default, the shards' own) and copied once into the batch buffer; 15% of real regions are
  selected (``region_masked``). The batch carries the ORIGINAL features only: the model zeroes the
  selected ones on the device and they are the MRFR targets; ``moc_labels`` holds their class.
* Text is padded to the longest caption in the batch (already truncated to ``max_text_len``).

``PretrainCollator.begin(samples, rng)`` builds a batch while its features are still being
copied (``copy_engine``) and returns a ``BatchHandle``; ``handle.result()`` is the batch.
``pad_tokens`` and ``pad_regions`` (padding only, no randomness) also build the retrieval split
(``retrieval_split.py``), so eval inputs are padded exactly like training batches.
"""
from __future__ import annotations
from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

import numpy as np
import torch

from imagebert_ds.data.copy_engine import CopyEngine, FeatureCopies, start_copies
from imagebert_ds.data.decode import Sample, region_problem

__all__ = ["IGNORE", "REGION_DTYPES", "BatchHandle", "PaddedRegions", "PretrainCollator",
           "Sample", "box_features", "pad_regions", "pad_tokens"]

IGNORE = -100
#: ``data.region_dtype`` -> the batch's feature dtype (float16: the shards' own, half the bytes)
REGION_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def box_features(box: np.ndarray, width, height, key: str = "") -> np.ndarray:
    """(..., 4) pixel boxes -> (..., 5) ``(x1/W, y1/H, x2/W, y2/H, area/(W*H))`` in [0, 1].

    ``width``/``height`` broadcast against ``box[..., 0]`` (scalars for one sample, (B, 1) for a
    padded batch); ``key`` names the sample in the error for a non-positive size.
    """
    if box.ndim < 2 or box.shape[-1] != 4:
        raise ValueError(f"{key}: .box.npy must have shape (R, 4), got {box.shape}")
    w, h = np.asarray(width, np.float32), np.asarray(height, np.float32)
    if not ((w > 0).all() and (h > 0).all()):
        raise ValueError(f"{key}: .json needs positive 'width' and 'height' for the box location")
    b = box.astype(np.float32, copy=False)
    out = np.empty(box.shape[:-1] + (5,), np.float32)
    np.clip(b[..., 0] / w, 0, 1, out=out[..., 0])
    np.clip(b[..., 1] / h, 0, 1, out=out[..., 1])
    np.clip(b[..., 2] / w, 0, 1, out=out[..., 2])
    np.clip(b[..., 3] / h, 0, 1, out=out[..., 3])
    out[..., 4] = np.clip(out[..., 2] - out[..., 0], 0, 1) * np.clip(out[..., 3] - out[..., 1], 0, 1)
    return out


def pad_tokens(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ``(ids, attention_mask)``, both (N, L) int64, L = the longest list."""
    lens = np.fromiter(map(len, seqs), np.int64, len(seqs))
    real = np.arange(lens.max())[None, :] < lens[:, None]  # (N, L): row-major = token order
    ids = np.full(real.shape, pad_id, np.int64)
    ids[real] = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, int(lens.sum()))
    return ids, real.astype(np.int64)


class PaddedRegions(NamedTuple):
    """``pad_regions``' output: B samples' regions padded / truncated to R, zeros past the real."""

    feats: np.ndarray  # (B, R, D) in the requested dtype (a view of ``out`` when one was given)
    boxes: np.ndarray  # (B, R, 5) float32, ``box_features``
    mask: np.ndarray  # (B, R) int64, 1 = real region
    labels: np.ndarray | None  # (B, R) int64 class, IGNORE where none; None if no sample has cls
    probs: np.ndarray | None  # (B, R, C) float32 class distribution; None if no sample has one
    feats_finite: bool | None = None  # all features finite (``check_finite``); None: not checked


def pad_regions(samples: Sequence[Sample], max_regions: int, feat_dim: int,
                dtype=np.float32, out: np.ndarray | None = None, pool=None, workers: int = 1,
                check_finite: bool = False) -> PaddedRegions:
    """Stack ``samples``' ``roi``/``box``/``cls`` into fixed-size arrays; bad shapes name the key.

    Uses each sample's first ``max_regions`` regions; ``width``/``height`` normalize the boxes.
    Features are copied once, sample by sample, into ``out`` ((B, R, D), e.g. a view of a pinned
    torch buffer; only its padding rows are zeroed) or a fresh ``dtype`` array -- with a ``pool``
    (a ``concurrent.futures`` executor of ``workers`` threads) in that many contiguous chunks of
    samples (reads and copies release the GIL); ``check_finite`` tests the features as they are
    copied (``feats_finite``).
    """
    B, R, D = len(samples), max_regions, feat_dim
    feats = np.empty((B, R, D), dtype) if out is None else out  # (B, R, D)
    if feats.shape != (B, R, D):
        raise ValueError(f"feature buffer has shape {feats.shape}, expected {(B, R, D)}")
    n_real = _n_real(samples, feats)
    copies = start_copies(list(samples), n_real, feats, check_finite,
                          pool if workers > 1 else None, chunk=-(-B // max(1, workers)))
    padded = _layout(samples, n_real, feats)
    ok = copies.result()
    return padded._replace(feats_finite=ok if check_finite else None)


def _n_real(samples: Sequence[Sample], feats: np.ndarray, checked: bool = False) -> list[int]:
    """Regions kept per sample, ``min(its regions, R)``, for the (B, R, D) buffer ``feats``; a
    sample with bad region arrays raises naming its key, unless ``checked`` (``decode`` has
    found ``region_problem`` to be None)."""
    _, R, D = feats.shape
    if not checked:
        for s in samples:
            problem = region_problem(s, D)
            if problem:
                raise ValueError(f"{s.key}: {problem}")
    return [min(s.roi.shape[0], R) for s in samples]


def _layout(samples: Sequence[Sample], n_real: list[int], feats: np.ndarray) -> PaddedRegions:
    """Boxes, mask and labels of a batch whose features go to ``feats`` (maybe being copied)."""
    B, R, _ = feats.shape
    # each sample's rows scattered into the (B, R) slots where ``real`` holds (row-major
    # order = each sample's rows in order)
    real = np.arange(R)[None, :] < np.asarray(n_real, np.int64)[:, None]  # (B, R)
    full = min(n_real) == R  # every slot real (e.g. a detector's fixed 100 boxes): no scatter
    raw_boxes = np.zeros((B, R, 4), np.float32)
    _scatter(raw_boxes, real, full, _rows([s.box for s in samples], n_real, 4))
    size = np.ones((2, B, 1), np.float32)  # (width, height) per row; 1 without regions
    size[0, :, 0] = [s.width if n else 1.0 for s, n in zip(samples, n_real)]
    size[1, :, 0] = [s.height if n else 1.0 for s, n in zip(samples, n_real)]
    labels = np.full((B, R), IGNORE, np.int64)
    cls = [s.cls for s in samples]
    has_labels = any(c is not None for c in cls)
    n_cls = max((c.shape[1] for c in cls if c is not None and c.ndim == 2), default=0)
    probs = np.zeros((B, R, n_cls), np.float32) if n_cls else None
    if has_labels and all(c is not None and c.ndim == 1 for c in cls):  # one scatter
        _scatter(labels, real, full, _rows(cls, n_real))
    elif has_labels:
        for i, (c, n) in enumerate(zip(cls, n_real)):
            if c is not None and c.ndim == 2:
                probs[i, :n, :c.shape[1]] = c[:n]
                labels[i, :n] = c[:n].argmax(1)
            elif c is not None:
                labels[i, :n] = c[:n]
    mask = real.astype(np.int64)  # (B, R)
    boxes = box_features(raw_boxes, size[0], size[1])  # padding rows: zero boxes -> zeros
    return PaddedRegions(feats, boxes, mask, labels if has_labels else None, probs)


def _scatter(out: np.ndarray, real: np.ndarray, full: bool, rows: np.ndarray) -> None:
    """``out[real] = rows`` ((B, R, ...) slots, row-major); a plain copy when ``full``."""
    if full:
        out[...] = rows.reshape(out.shape)
    else:
        out[real] = rows


def _rows(arrays: list[np.ndarray], n: list[int], width: int | None = None) -> np.ndarray:
    """The first ``n[i]`` rows of each of ``arrays``, concatenated (empty: shape (0[, width]))."""
    if not arrays or not sum(n):
        return np.zeros((0,) if width is None else (0, width), np.float32)
    return np.concatenate([a[:k] for a, k in zip(arrays, n)])


class BatchHandle:
    """A batch from ``PretrainCollator.begin`` whose region features may still be copied:
    ``wait()`` until they are, ``result()`` the batch (re-raising a copy's error, e.g. a shard
    that changed on disk). ``feats_finite`` is known after ``result()``: whether every feature
    is finite (None without regions)."""

    def __init__(self, batch: dict, copies: FeatureCopies | None):
        self._batch, self._copies = batch, copies
        self.feats_finite: bool | None = None

    def wait(self) -> None:
        """Until the feature copies are done."""
        if self._copies is not None:
            self._copies.wait()

    def result(self) -> dict:
        """The batch, its ``region_feats`` filled."""
        if self._copies is not None and self.feats_finite is None:
            self.feats_finite = self._copies.result()
        return self._batch


class PretrainCollator:
    """Builds contract batches from lists of ``Sample``; all randomness from the given rng.

    ``encode`` (captions -> token id lists, e.g. ``captions.CaptionEncoder``) tokenizes the
    captions ``begin`` is given; ``read_threads`` are the feature-copy threads
    (``copy_engine.copy_threads``; 0: the caller's thread copies)."""

    def __init__(self, *, vocab_size: int, pad_id: int, cls_id: int, sep_id: int, mask_id: int,
                 special_ids: list[int], max_regions: int = 36, region_feat_dim: int = 2048,
                 mlm_prob: float = 0.15, region_mask_prob: float = 0.15,
                 itm_neg_prob: float = 0.5, use_regions: bool = True, use_images: bool = False,
                 region_dtype: str = "float16", pin_memory: bool = False, read_threads: int = 0,
                 encode=None):
        self.pad_id, self.mask_id = pad_id, mask_id
        self.special = np.asarray(sorted(set(special_ids) | {pad_id, cls_id, sep_id, mask_id}))
        # random replacement draws from non-special tokens only
        self.random_pool = np.setdiff1d(np.arange(vocab_size), self.special)
        self._is_special = np.zeros(max(vocab_size, int(self.special.max()) + 1), bool)
        self._is_special[self.special] = True  # a lookup per token: np.isin sorts every batch
        self.max_regions, self.feat_dim = max_regions, region_feat_dim
        self.mlm_prob, self.region_mask_prob, self.itm_neg_prob = (mlm_prob, region_mask_prob,
                                                                   itm_neg_prob)
        self.use_regions, self.use_images = use_regions, use_images
        if region_dtype not in REGION_DTYPES:
            raise ValueError(f"region_dtype must be one of {sorted(REGION_DTYPES)}, got "
                             f"{region_dtype!r}")
        self.region_dtype = REGION_DTYPES[region_dtype]
        # page-locked batch buffers with pin_memory (a CUDA host: async H2D copies)
        self.copies = CopyEngine(read_threads, pin_memory)
        self.encode = encode
        self.last_feats_finite: bool | None = None  # of the last batch's features (checked)

    @classmethod
    def from_tokenizer(cls, tokenizer, **kw) -> "PretrainCollator":
        """Special-token ids and vocab size from a BERT WordPiece ``tokenizers.Tokenizer``."""
        ids = {t: tokenizer.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer has no {missing} token(s): a BERT WordPiece vocab is "
                             "needed")
        return cls(vocab_size=tokenizer.get_vocab_size(), pad_id=ids["[PAD]"], cls_id=ids["[CLS]"],
                   sep_id=ids["[SEP]"], mask_id=ids["[MASK]"], special_ids=list(ids.values()), **kw)

    def close(self) -> None:
        """Stop the copy threads (after their jobs); a later batch starts new ones."""
        self.copies.close()

    # --- text -------------------------------------------------------------------------------
    def itm_pairs(self, samples: list[Sample], rng: np.random.Generator
                  ) -> tuple[list[int], np.ndarray]:
        """Each row's caption source and ITM label: its own row (1) or, with ``itm_neg_prob``,
        a row of another image (0). Needs only the image ids, so the loader draws it before
        tokenizing (and tokenizes only the captions shown). The draws are those of
        ``rng.choice(np.flatnonzero(image_ids != image_ids[i]))`` per negative row (``choice``
        of an array draws ``integers(0, len)``), without building that array when the row's
        image is alone in the batch (the usual case)."""
        image_ids = np.asarray([s.image_id for s in samples])
        B = len(samples)
        same = image_ids[:, None] == image_ids[None, :]  # (B, B)
        n_others = B - same.sum(1)
        src, labels = list(range(B)), np.ones(B, np.int64)
        for i in range(B):
            if n_others[i] and rng.random() < self.itm_neg_prob:
                k = int(rng.integers(0, n_others[i]))
                # the k-th other row: skip row i itself when it is the only one of its image
                src[i] = k + (k >= i) if n_others[i] == B - 1 else int(np.flatnonzero(~same[i])[k])
                labels[i] = 0
        return src, labels

    def mask_tokens(self, ids: np.ndarray, attn: np.ndarray, rng: np.random.Generator):
        """BERT MLM corruption of (B, Lt) ``ids``; returns (corrupted ids, labels)."""
        maskable = (attn == 1) & ~self._is_special[ids]
        selected = maskable & (rng.random(ids.shape) < self.mlm_prob)
        labels = np.where(selected, ids, IGNORE)
        r = rng.random(ids.shape)
        out = ids.copy()
        out[selected & (r < 0.8)] = self.mask_id
        rand_pos = selected & (r >= 0.8) & (r < 0.9)
        out[rand_pos] = rng.choice(self.random_pool, size=int(rand_pos.sum()))
        return out, labels

    # --- regions ----------------------------------------------------------------------------
    def _regions(self, samples: list[Sample], checked: bool
                 ) -> tuple[torch.Tensor, PaddedRegions, FeatureCopies]:
        """The batch's feature buffer ((B, R, D) ``region_dtype``, possibly pinned), its copies
        started (checked for NaN/inf as they go), and the boxes / mask / labels built
        meanwhile."""
        B, R, D = len(samples), self.max_regions, self.feat_dim
        buf = self.copies.buffer((B, R, D), self.region_dtype)
        feats = buf.numpy()
        n_real = _n_real(samples, feats, checked)
        copies = self.copies.start(samples, n_real, feats, check_finite=True)
        return buf, _layout(samples, n_real, feats), copies

    def _region_keys(self, buf: torch.Tensor, reg: PaddedRegions,
                     rng: np.random.Generator) -> dict:
        """The batch's region tensors; real regions selected for masking with
        ``region_mask_prob``: the model zeroes them on the device and regresses / classifies
        them (docs/batch_contract.md)."""
        masked = (reg.mask == 1) & (rng.random(reg.mask.shape) < self.region_mask_prob)  # (B, R)
        out = {"region_feats": buf,
               "region_boxes": torch.from_numpy(reg.boxes),
               "region_mask": torch.from_numpy(reg.mask),
               "region_masked": torch.from_numpy(masked)}
        if reg.labels is not None:
            out["moc_labels"] = torch.from_numpy(np.where(masked, reg.labels, IGNORE))
            if reg.probs is not None:
                out["moc_probs"] = torch.from_numpy(reg.probs)
        return out

    # --- batch ------------------------------------------------------------------------------
    def begin(self, samples: list[Sample], rng: np.random.Generator,
              captions: list[str] | None = None, checked: bool = False) -> BatchHandle:
        """Start one contract batch (dict of CPU tensors) from ``samples``, drawing from ``rng``
        only: the region features are copied on the copy threads while the text side is built;
        the handle's ``result()`` is the batch once they are in. ``captions``: each sample's
        caption, of which only the rows the batch shows are tokenized (``encode``) into their
        ``token_ids``; else the samples' ``token_ids`` are used. ``checked``: the samples come
        from ``decode`` (their region arrays are known to be good)."""
        if not samples:
            raise ValueError("empty batch")
        regions = self._regions(samples, checked) if self.use_regions else None
        src, itm = self.itm_pairs(samples, rng)
        if captions is not None:  # the shown rows only, in one call of the tokenizer
            rows = sorted(set(src))
            for j, ids in zip(rows, self.encode([captions[j] for j in rows])):
                samples[j].token_ids = ids
        ids, attn = pad_tokens([samples[j].token_ids for j in src], self.pad_id)  # (B, Lt)
        ids, mlm = self.mask_tokens(ids, attn, rng)
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
                 "token_type_ids": torch.zeros(ids.shape, dtype=torch.int64),
                 "mlm_labels": torch.from_numpy(mlm), "itm_labels": torch.from_numpy(itm),
                 "image_ids": torch.tensor([s.image_id for s in samples], dtype=torch.int64)}
        copies = None
        if regions is not None:
            buf, reg, copies = regions
            batch.update(self._region_keys(buf, reg, rng))
        if self.use_images:
            missing = [s.key for s in samples if s.pixels is None]
            if missing:
                raise ValueError(f"{missing[0]}: image (.jpg) missing but use_images is set")
            batch["pixel_values"] = torch.from_numpy(np.stack([s.pixels for s in samples]))
        return BatchHandle(batch, copies)

    def __call__(self, samples: list[Sample], rng: np.random.Generator) -> dict:
        """``begin(samples, rng).result()``; ``last_feats_finite`` says whether the batch's
        features are all finite."""
        handle = self.begin(samples, rng)
        batch = handle.result()
        self.last_feats_finite = handle.feats_finite
        return batch
