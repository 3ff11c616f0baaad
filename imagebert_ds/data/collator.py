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
import math
import os
import threading
import weakref
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


#: float16 elements per reduction of ``all_finite`` (64 MiB: a batch in one or two calls, each
#: a release of the GIL)
_CHUNK = 1 << 25


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

    @property
    def padded(self) -> PaddedRegions:
        """Boxes, mask and labels (built); ``feats`` may still be being filled."""
        return self._padded

    def wait(self) -> None:
        """Until every feature copy has finished (an error is raised by ``result``)."""
        from concurrent.futures import wait

        wait([r for r in self._reads if hasattr(r, "result")])

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
    """Each sample's first ``n_real[i]`` feature rows into ``feats[i]`` (zeros after), then
    whether they are all finite (when ``check_finite``). Runs on a pool thread: the rows that
    are raw bytes of the batch's dtype (``shards.NpyRef`` views of the shard's memory map, or
    arrays of that dtype) and the zero padding are gathered by ONE ``torch.cat`` into the
    buffer, and checked by one reduction -- two releases of the GIL per job, not a few per
    sample: a thread that must take the GIL back after each sample's read waits for every
    switch interval the loader's Python thread runs meanwhile."""
    k, R, D = feats.shape
    row_bytes = D * feats.itemsize
    flat = feats.reshape(-1).view(np.uint8)
    pieces: list[torch.Tensor] = []
    checked: dict[int, object] = {}  # one ``check_file`` per shard file: its farthest array
    for s in samples:
        roi = s.roi
        if hasattr(roi, "check_file"):
            far = checked.get(id(roi.file))
            if far is None or roi.offset + roi.nbytes > far.offset + far.nbytes:
                checked[id(roi.file)] = roi
    for roi in checked.values():  # a shard cut short after it was mapped must not fault
        roi.check_file()
    for s, n in zip(samples, n_real):
        roi = s.roi
        if hasattr(roi, "payload") and roi.direct(feats.dtype, (D,)):
            src = roi.payload(n * row_bytes)
        else:  # another dtype or order (or an in-memory array): converted here
            src = np.ascontiguousarray(np.asarray(roi)[:n], dtype=feats.dtype)
            src = src.reshape(-1).view(np.uint8)
            if not src.flags.writeable:  # torch.from_numpy warns on read-only arrays
                src = src.copy()
        pieces.append(torch.from_numpy(src))
        if n < R:
            pieces.append(_zeros((R - n) * row_bytes))
    if pieces:
        torch.cat(pieces, out=torch.from_numpy(flat))
    return all_finite(feats) if check_finite else True


_ZEROS = torch.zeros(0, dtype=torch.uint8)


def _zeros(nbytes: int) -> torch.Tensor:
    """``nbytes`` zero bytes (a view of one shared, growing zero buffer)."""
    global _ZEROS
    if len(_ZEROS) < nbytes:
        _ZEROS = torch.zeros(max(nbytes, 2 * len(_ZEROS)), dtype=torch.uint8)
    return _ZEROS[:nbytes]


def copy_threads(num_threads: int) -> int:
    """The loader's feature-copy threads for ``data.num_threads``: none (the producer thread
    copies) for 1; else ``num_threads``, but at most the CPUs this process may run on but one
    (the producer thread's). The loader's Python is one thread holding the GIL; each copy
    thread takes the GIL back a few times per job, and a thread that holds it while the OS has
    preempted it (more busy threads than cores) stalls the producer. Measured on 2 CPUs,
    interleaved in one process: one copy thread with one job a batch made the loader 15%
    faster than two threads with four jobs (10 of 12 rounds), and than two threads with one job
    a batch (12 of 12)."""
    if num_threads <= 1:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(num_threads, (cpus or 1) - 1))


def serial_torch_pool(workers: int, prefix: str):
    """A ``ThreadPoolExecutor`` of ``workers`` threads, all started now, whose torch ops run
    single-threaded. The pool is the loader's own parallelism (``data.num_threads``); torch's
    intra-op threads under each of its copies would oversubscribe the CPUs -- and a ``torch.cat``
    of a batch's 64 features opens 64 OpenMP regions, whose workers spin between them, taking
    the CPU the loader's Python needs. OpenMP's thread count is a per-thread setting: each pool
    thread sets its own to 1 (``torch.set_num_threads`` also sets the process default that new
    threads start from), then the default is put back here, once every thread has set its own."""
    from concurrent.futures import ThreadPoolExecutor

    default = torch.get_num_threads()
    started = threading.Barrier(workers + 1)

    def init():
        torch.get_num_threads()  # this thread takes the process default now ...
        torch.set_num_threads(1)  # ... then its own count becomes 1

    pool = ThreadPoolExecutor(workers, thread_name_prefix=prefix, initializer=init)
    for _ in range(workers):  # each blocked task makes the pool start one more thread
        pool.submit(started.wait)
    started.wait()
    torch.set_num_threads(default)  # the default again (this thread's own count too)
    return pool


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


class BufferPool:
    """Batch-sized host buffers, reused once nothing refers to a batch any more.

    A fresh 26 MB array (a paper-shape batch of features) is new memory that the kernel zeroes
    on first touch -- as much time as the copy into it. ``tensor()`` hands out a torch tensor
    over a recycled buffer instead: the tensor holds the numpy array it was made from (so does
    every view of it, and ``.numpy()`` of any of them), and when that array is freed its
    buffer returns here. At most ``keep`` idle buffers are kept."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._idle: dict[int, list[np.ndarray]] = {}  # nbytes -> idle uint8 buffers

    def tensor(self, shape: tuple[int, ...], dtype) -> torch.Tensor:
        """An uninitialized tensor of ``shape`` and numpy ``dtype`` on a recycled buffer."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        idle = self._idle.setdefault(nbytes, [])
        try:
            raw = idle.pop()
        except IndexError:
            raw = np.empty(nbytes, np.uint8)
        arr = raw.view(dtype).reshape(shape)  # only ever reached through the tensor below
        weakref.finalize(arr, self._release, raw)
        return torch.from_numpy(arr)

    def _release(self, raw: np.ndarray) -> None:
        idle = self._idle.setdefault(raw.nbytes, [])
        if len(idle) < self.keep:
            idle.append(raw)


class PretrainCollator:
    """Builds a contract batch from a list of ``Sample``; all randomness from the given rng."""

    def __init__(self, *, vocab_size: int, pad_id: int, cls_id: int, sep_id: int, mask_id: int,
                 special_ids: list[int], max_regions: int = 36, region_feat_dim: int = 2048,
                 mlm_prob: float = 0.15, region_mask_prob: float = 0.15,
                 itm_neg_prob: float = 0.5, use_regions: bool = True, use_images: bool = False,
                 region_dtype: str = "float16", pin_memory: bool = False, read_threads: int = 0):
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
        self.pin_memory = pin_memory  # page-locked batch buffers (a CUDA host: async H2D copies)
        # threads copying / checking the region features (``copy_threads``); 0: the caller's
        self.read_threads = read_threads
        self._pool = None
        self._buffers = BufferPool()
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
        features, or None (``read_threads`` 0: the caller's thread copies them)."""
        if self._pool is None and self.read_threads > 0:
            self._pool = serial_torch_pool(self.read_threads, "collate")
        return self._pool

    def close(self) -> None:
        """Stop the pool's threads (after their jobs); a later batch starts a new pool."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

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
    def region_reads(self, batch_size: int) -> RegionReads:
        """Empty region reads for a batch of ``batch_size``: ``add`` its samples as they are
        picked (their features are copied and checked for NaN/inf on the pool, meanwhile: one
        job per pool thread, each of a contiguous share of the batch, started once its samples
        are in), then pass it to ``__call__`` / ``start``."""
        B, R, D = batch_size, self.max_regions, self.feat_dim
        if self.pin_memory:  # CUDA's caching host allocator recycles the page-locked blocks
            buf = torch.empty((B, R, D), dtype=self.region_dtype, pin_memory=True)
        else:  # recycled: fresh memory of this size is zeroed by the kernel at every batch
            buf = self._buffers.tensor((B, R, D), _NUMPY_DTYPES[self.region_dtype])
        pool = self.executor()
        chunk = -(-B // max(1, self.read_threads))  # few jobs: each takes the GIL a few times
        return RegionReads(buf, RegionReader(B, R, D, out=buf.numpy(), pool=pool,
                                             chunk=chunk, check_finite=True))

    def read_regions(self, samples: list[Sample]) -> RegionReads:
        """``region_reads`` with all of ``samples`` added."""
        reads = self.region_reads(len(samples))
        for s in samples:
            reads.add(s)
        return reads

    def _regions(self, reads: RegionReads, rng: np.random.Generator
                 ) -> tuple[dict, PendingRegions]:
        """Padded regions (features once, in ``region_dtype``, into a possibly pinned buffer);
        real ones selected for masking with ``region_mask_prob``: the model zeroes them on the
        device and regresses / classifies them (docs/batch_contract.md). The feature reads may
        still run: the returned ``PendingRegions`` says when ``region_feats`` is filled."""
        pending = reads.finish()
        reg = pending.padded  # all but the features, which may still be copied
        masked = (reg.mask == 1) & (rng.random(reg.mask.shape) < self.region_mask_prob)  # (B, R)
        out = {"region_feats": reads.feats,
               "region_boxes": torch.from_numpy(reg.boxes),
               "region_mask": torch.from_numpy(reg.mask),
               "region_masked": torch.from_numpy(masked)}
        if reg.labels is not None:
            out["moc_labels"] = torch.from_numpy(np.where(masked, reg.labels, IGNORE))
            if reg.probs is not None:
                out["moc_probs"] = torch.from_numpy(reg.probs)
        return out, pending

    # --- batch ------------------------------------------------------------------------------
    def __call__(self, samples: list[Sample], rng: np.random.Generator,
                 regions: RegionReads | None = None,
                 itm: tuple[list[int], np.ndarray] | None = None) -> dict:
        """One contract batch (dict of CPU tensors) from ``samples``; draws from ``rng`` only.
        ``regions``: the reads ``region_reads`` / ``read_regions`` started for ``samples`` (else
        they start here); ``itm``: ``itm_pairs(samples, rng)`` drawn already (else drawn here;
        only the shown rows' ``token_ids`` are read). ``start`` without the wait for the
        feature reads."""
        batch, pending = self.start(samples, rng, regions, itm)
        if pending is not None:
            self.last_feats_finite = pending.result().feats_finite
        return batch

    def start(self, samples: list[Sample], rng: np.random.Generator,
              regions: RegionReads | None = None,
              itm: tuple[list[int], np.ndarray] | None = None
              ) -> tuple[dict, PendingRegions | None]:
        """``__call__``'s batch while its region features may still be read on the pool, and
        the ``PendingRegions`` to wait for (``result()``) before ``region_feats`` is used (None
        without regions): the caller goes on with the next batch meanwhile."""
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
        pending = None
        if self.use_regions:
            reg, pending = self._regions(regions, rng)
            batch.update(reg)
        if self.use_images:
            missing = [s.key for s in samples if s.pixels is None]
            if missing:
                raise ValueError(f"{missing[0]}: image (.jpg) missing but use_images is set")
            batch["pixel_values"] = torch.from_numpy(np.stack([s.pixels for s in samples]))
        return batch, pending
