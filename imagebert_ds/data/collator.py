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

``pad_tokens`` and ``pad_regions`` (padding only, no randomness) also build the retrieval split
(``retrieval_split.py``), so eval inputs are padded exactly like training batches.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

IGNORE = -100
#: ``data.region_dtype`` -> the batch's feature dtype (float16: the shards' own, half the bytes)
REGION_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


@dataclass
class Sample:
    """One decoded sample, as the loader hands it to the collator (and ``pad_regions`` reads it)."""

    key: str  # "shard.tar:KEY" for error messages
    image_id: int
    token_ids: list[int]  # [CLS] ... [SEP], truncated
    width: float = 0.0
    height: float = 0.0
    roi: np.ndarray | None = None  # (R, D) float16/32, or a shards.NpyRef read into the batch
    box: np.ndarray | None = None  # (R, 4) pixel x1, y1, x2, y2
    cls: np.ndarray | None = None  # (R,) int labels or (R, C) class distribution
    pixels: np.ndarray | None = None  # (3, H, W) float32, normalized


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


def region_problem(s: Sample, feat_dim: int) -> str | None:
    """What is wrong with a sample's region arrays (shapes, sizes; O(1), no pass over the
    values), or None. The loader drops such samples (``data.on_bad_sample``); ``pad_regions``
    refuses them."""
    roi, box, cls = s.roi, s.box, s.cls
    if roi is None or box is None:
        return "region data (.roi.npy/.box.npy) missing"
    rs, bs = roi.shape, box.shape  # tuples only: this runs twice per sample per batch
    if len(rs) != 2 or rs[1] != feat_dim:
        return f".roi.npy must have shape (R, {feat_dim}), got {rs}"
    if len(bs) != 2 or bs[1] != 4:
        return f".box.npy must have shape (R, 4), got {bs}"
    if bs[0] != rs[0]:
        return f"{rs[0]} features but {bs[0]} boxes"
    if cls is not None and (cls.ndim not in (1, 2) or cls.shape[0] != rs[0]):
        return f"{rs[0]} features but .cls.npy of shape {cls.shape}"
    if rs[0] and not (s.width > 0 and s.height > 0):
        return ".json needs positive 'width' and 'height' for the box location"
    return None


def nonfinite_rows(batch: dict, feats_finite: bool | None = None) -> np.ndarray:
    """Rows of a collated batch whose region features or boxes hold NaN/inf. The fast path (the
    usual: nothing found) is one pass over each buffer (``all_finite``); rows only then.
    ``feats_finite=True``: the collator already checked the features (``pad_regions``)."""
    bad = np.zeros(len(batch["input_ids"]), bool)
    keys = ("region_boxes",) if feats_finite else ("region_feats", "region_boxes")
    for k in keys:  # decoded images are finite by construction
        if k in batch:
            a = batch[k].numpy()
            if not all_finite(a):
                bad |= ~np.isfinite(a.reshape(len(a), -1)).all(1)
    return np.flatnonzero(bad)


#: float16 elements per chunk of ``all_finite`` (256 KiB: the second pass reads it from cache)
_CHUNK = 1 << 17


def all_finite(a: np.ndarray) -> bool:
    """``np.isfinite(a).all()``, fast for float16 too: numpy has no SIMD float16 isfinite (6x a
    copy of the array), so SIMD max-reductions over integer views test the exponent bits, chunk
    by chunk, with no temporary. A float16 is inf/NaN iff its bits ``u`` have ``u & 0x7FFF >=
    0x7C00``: the uint16 max ``m`` settles it when ``m < 0x7C00`` (no sign bit, no exponent of
    all ones: finite; one pass, the usual case for post-ReLU detector features) or ``m >=
    0xFC00`` (a negative inf/NaN); otherwise the int16 max finds a positive one (``>= 0x7C00``)."""
    if a.dtype != np.float16:
        return bool(np.isfinite(a).all())
    u = np.ascontiguousarray(a).reshape(-1).view(np.uint16)
    s = u.view(np.int16)
    for start in range(0, len(u), _CHUNK):
        m = u[start:start + _CHUNK].max()
        if m >= 0xFC00 or (m >= 0x7C00 and s[start:start + _CHUNK].max() >= 0x7C00):
            return False
    return True


def pad_regions(samples: Sequence[Sample], max_regions: int, feat_dim: int,
                dtype=np.float32, out: np.ndarray | None = None, pool=None, workers: int = 1,
                check_finite: bool = False) -> PaddedRegions:
    """Stack ``samples``' ``roi``/``box``/``cls`` into fixed-size arrays; bad shapes name the key.

    Uses each sample's first ``max_regions`` regions; ``width``/``height`` normalize the boxes.
    Features are copied once, sample by sample, into ``out`` ((B, R, D), e.g. a view of a pinned
    torch buffer; only its padding rows are zeroed) or a fresh ``dtype`` array -- with a ``pool``
    (a ``concurrent.futures`` executor of ``workers`` threads) in that many contiguous chunks of
    samples (reads and copies release the GIL); ``check_finite`` tests each sample's features
    right after its read, while they are in cache (``feats_finite``). The box features are
    computed for the whole batch at once (``RegionReader``, which the loader feeds sample by
    sample instead).
    """
    B = len(samples)
    reader = RegionReader(B, max_regions, feat_dim, dtype, out,
                          pool if workers > 1 else None, chunk=-(-B // max(1, workers)),
                          check_finite=check_finite)
    for s in samples:
        reader.add(s)
    return reader.finish().result()


class PendingRegions:
    """A batch's padded regions whose feature reads may still be running (futures on the pool,
    or done); ``result()`` waits for them and returns the ``PaddedRegions``."""

    def __init__(self, padded: PaddedRegions, reads: list, check_finite: bool):
        self._padded, self._reads, self._check = padded, reads, check_finite

    def result(self) -> PaddedRegions:
        """The padded regions, once every feature row is in the buffer (re-raises a read's
        error, e.g. a shard that changed on disk)."""
        ok = all([r.result() if hasattr(r, "result") else r for r in self._reads])
        return self._padded._replace(feats_finite=ok if self._check else None)


class RegionReader:
    """Pads a batch's regions as its samples arrive. ``add(sample)`` checks it (a bad shape
    names the key) and, each time ``chunk`` samples have come, starts reading their features
    into the (B, R, D) buffer on ``pool`` (without a pool all are read in ``finish``), so the
    reads overlap the picking of the next samples; ``finish()`` starts the rest and computes the
    boxes, mask and labels for the whole batch while the reads go on: a ``PendingRegions``."""

    def __init__(self, batch_size: int, max_regions: int, feat_dim: int, dtype=np.float32,
                 out: np.ndarray | None = None, pool=None, chunk: int = 16,
                 check_finite: bool = False):
        B, R, D = batch_size, max_regions, feat_dim
        self.feats = np.empty((B, R, D), dtype) if out is None else out  # (B, R, D_roi)
        if self.feats.shape != (B, R, D):
            raise ValueError(f"feature buffer has shape {self.feats.shape}, expected {(B, R, D)}")
        self.pool, self.chunk, self.check_finite = pool, max(1, chunk), check_finite
        self.samples: list[Sample] = []
        self.n_real: list[int] = []  # regions kept per sample: min(its regions, R)
        self.reads: list = []  # futures (or results) of the chunks started so far
        self._started = 0  # samples whose reads are started
        self._pending: PendingRegions | None = None

    def add(self, s: Sample, checked: bool = False) -> None:
        """One more sample of the batch (in batch order); ``checked``: the caller has just
        found ``region_problem(s)`` to be None (the loader, which skips bad samples)."""
        B, R, D = self.feats.shape
        if len(self.samples) == B:
            raise ValueError(f"{s.key}: the batch of {B} samples is full")
        problem = None if checked else region_problem(s, D)
        if problem:
            raise ValueError(f"{s.key}: {problem}")
        self.samples.append(s)
        self.n_real.append(min(s.roi.shape[0], R))
        if self.pool is not None and len(self.samples) - self._started >= self.chunk:
            self._start_reads()

    def _start_reads(self) -> None:
        lo, hi = self._started, len(self.samples)
        if hi > lo:
            job = (self.samples[lo:hi], self.n_real[lo:hi], self.feats[lo:hi], self.check_finite)
            self.reads.append(_copy_rows(*job) if self.pool is None else
                              self.pool.submit(_copy_rows, *job))
        self._started = hi

    def finish(self) -> PendingRegions:
        """Every sample added: start the last reads and build the rest (once)."""
        if self._pending is not None:
            return self._pending
        B, R, _ = self.feats.shape
        if len(self.samples) != B:
            raise ValueError(f"{len(self.samples)} samples added to a batch of {B}")
        self._start_reads()
        samples, n_real = self.samples, self.n_real
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
        padded = PaddedRegions(self.feats, boxes, mask, labels if has_labels else None, probs)
        self._pending = PendingRegions(padded, self.reads, self.check_finite)
        return self._pending


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


def _copy_rows(samples: list[Sample], n_real: list[int], feats: np.ndarray,
               check_finite: bool) -> bool:
    """Each sample's first ``n_real[i]`` feature rows into ``feats[i]`` (zeros after; runs on a
    pool thread: reads and numpy release the GIL); whether they are all finite (when
    ``check_finite``, tested sample by sample right after its read, while it is in cache)."""
    ok = True
    for row, s, n in zip(feats, samples, n_real):
        roi = s.roi
        if hasattr(roi, "read_into"):  # shards.NpyRef: one read from the shard into the batch
            roi.read_into(row[:n])
        else:
            row[:n] = roi[:n]
        if n < len(row):
            row[n:] = 0
        if check_finite and ok:  # padding zeros are finite
            ok = all_finite(row[:n])
    return ok


#: samples per feature-read job on the collator's pool (a 64-sample batch: 4 jobs, started
#: while the next samples are picked)
READ_CHUNK = 16


class RegionReads(NamedTuple):
    """``PretrainCollator.region_reads``' handle: the batch's feature tensor and its reader."""

    feats: torch.Tensor  # (B, R, D) region_dtype, possibly pinned; filled by ``reader``
    reader: RegionReader

    def add(self, s: Sample, checked: bool = False) -> None:
        """The next sample of the batch (its features are read on the pool)."""
        self.reader.add(s, checked)

    def finish(self) -> PendingRegions:
        """All samples added: the last reads started, boxes / mask / labels built."""
        return self.reader.finish()


class PretrainCollator:
    """Builds a contract batch from a list of ``Sample``; all randomness from the given rng."""

    def __init__(self, *, vocab_size: int, pad_id: int, cls_id: int, sep_id: int, mask_id: int,
                 special_ids: list[int], max_regions: int = 36, region_feat_dim: int = 2048,
                 mlm_prob: float = 0.15, region_mask_prob: float = 0.15,
                 itm_neg_prob: float = 0.5, use_regions: bool = True, use_images: bool = False,
                 region_dtype: str = "float16", pin_memory: bool = False, read_threads: int = 1):
        self.pad_id, self.mask_id = pad_id, mask_id
        self.special = np.asarray(sorted(set(special_ids) | {pad_id, cls_id, sep_id, mask_id}))
        # random replacement draws from non-special tokens only
        self.random_pool = np.setdiff1d(np.arange(vocab_size), self.special)
        self.max_regions, self.feat_dim = max_regions, region_feat_dim
        self.mlm_prob, self.region_mask_prob, self.itm_neg_prob = (mlm_prob, region_mask_prob,
                                                                   itm_neg_prob)
        self.use_regions, self.use_images = use_regions, use_images
        if region_dtype not in REGION_DTYPES:
            raise ValueError(f"region_dtype must be one of {sorted(REGION_DTYPES)}, got "
                             f"{region_dtype!r}")
        self.region_dtype = REGION_DTYPES[region_dtype]
        self.pin_memory = pin_memory  # page-locked batch buffers (a CUDA host: async H2D copies)
        self.read_threads = read_threads  # threads reading / checking the region features
        self._pool = None
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

    def executor(self):
        """The thread pool (``read_threads`` workers, made on first use) that reads the region
        features, or None for one thread."""
        if self._pool is None and self.read_threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="collate")
        return self._pool

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
        maskable = (attn == 1) & ~np.isin(ids, self.special)
        selected = maskable & (rng.random(ids.shape) < self.mlm_prob)
        labels = np.where(selected, ids, IGNORE)
        r = rng.random(ids.shape)
        out = ids.copy()
        out[selected & (r < 0.8)] = self.mask_id
        rand_pos = selected & (r >= 0.8) & (r < 0.9)
        out[rand_pos] = rng.choice(self.random_pool, size=int(rand_pos.sum()))
        return out, labels

    # --- regions ----------------------------------------------------------------------------
    def region_reads(self, batch_size: int) -> RegionReads:
        """Empty region reads for a batch of ``batch_size``: ``add`` its samples as they are
        picked (their features are read on the pool, ``READ_CHUNK`` at a time, meanwhile), then
        pass it to ``__call__``."""
        B, R, D = batch_size, self.max_regions, self.feat_dim
        if self.pin_memory:  # CUDA's caching host allocator recycles the page-locked blocks
            buf = torch.empty((B, R, D), dtype=self.region_dtype, pin_memory=True)
        else:  # numpy's heap reuse: a fresh torch.empty of this size page-faults every batch (6x)
            buf = torch.from_numpy(np.empty((B, R, D), _NUMPY_DTYPES[self.region_dtype]))
        pool = self.executor()
        return RegionReads(buf, RegionReader(B, R, D, out=buf.numpy(), pool=pool,
                                             chunk=READ_CHUNK, check_finite=True))

    def read_regions(self, samples: list[Sample]) -> RegionReads:
        """``region_reads`` with all of ``samples`` added."""
        reads = self.region_reads(len(samples))
        for s in samples:
            reads.add(s)
        return reads

    def _regions(self, reads: RegionReads, rng: np.random.Generator) -> dict:
        """Padded regions (features once, in ``region_dtype``, into a possibly pinned buffer);
        real ones selected for masking with ``region_mask_prob``: the model zeroes them on the
        device and regresses / classifies them (docs/batch_contract.md)."""
        reg = reads.finish().result()
        self.last_feats_finite = reg.feats_finite
        masked = (reg.mask == 1) & (rng.random(reg.mask.shape) < self.region_mask_prob)  # (B, R)
        out = {"region_feats": reads.feats,
               "region_boxes": torch.from_numpy(reg.boxes),
               "region_mask": torch.from_numpy(reg.mask),
               "region_masked": torch.from_numpy(masked)}
        if reg.labels is not None:
            out["moc_labels"] = torch.from_numpy(np.where(masked, reg.labels, IGNORE))
            if reg.probs is not None:
                out["moc_probs"] = torch.from_numpy(reg.probs)
        return out

    # --- batch ------------------------------------------------------------------------------
    def __call__(self, samples: list[Sample], rng: np.random.Generator,
                 regions: RegionReads | None = None,
                 itm: tuple[list[int], np.ndarray] | None = None) -> dict:
        """One contract batch (dict of CPU tensors) from ``samples``; draws from ``rng`` only.
        ``regions``: the reads ``region_reads`` / ``read_regions`` started for ``samples`` (else
        they start here); ``itm``: ``itm_pairs(samples, rng)`` drawn already (else drawn here;
        only the shown rows' ``token_ids`` are read)."""
        if not samples:
            raise ValueError("empty batch")
        if self.use_regions and regions is None:
            regions = self.read_regions(samples)  # on the pool while the text side is built
        elif regions is not None and (len(regions.reader.samples) != len(samples) or any(
                a is not b for a, b in zip(regions.reader.samples, samples))):
            raise ValueError("the region reads were started for other samples than the batch's")
        src, itm = self.itm_pairs(samples, rng) if itm is None else itm
        texts = [samples[j].token_ids for j in src]
        ids, attn = pad_tokens(texts, self.pad_id)  # (B, Lt)
        ids, mlm = self.mask_tokens(ids, attn, rng)
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
                 "token_type_ids": torch.zeros(ids.shape, dtype=torch.int64),
                 "mlm_labels": torch.from_numpy(mlm), "itm_labels": torch.from_numpy(itm),
                 "image_ids": torch.tensor([s.image_id for s in samples], dtype=torch.int64)}
        if self.use_regions:
            batch.update(self._regions(regions, rng))
        if self.use_images:
            missing = [s.key for s in samples if s.pixels is None]
            if missing:
                raise ValueError(f"{missing[0]}: image (.jpg) missing but use_images is set")
            batch["pixel_values"] = torch.from_numpy(np.stack([s.pixels for s in samples]))
        return batch
