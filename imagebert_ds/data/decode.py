"""One sample, decoded and checked: a reader's record -> ``Sample``, or the reason it is bad.

Every check the loader makes on a sample lives here: the reader's own errors (a member that is
not a valid ``.npy``, a key missing from the index), NaN/inf boxes, the ``.json`` and ``.txt``
(``shards.format``), the region arrays' shapes (``region_problem``), and -- once a batch's
features are copied -- NaN/inf features (``all_finite``, ``nonfinite_rows``). The loader decides
what a bad sample costs (``data.on_bad_sample``: an error, or skipped / repaired, counted and
logged); docs/data.md describes the policy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from imagebert_ds.data.shards.format import image_id_of, parse_meta, split_captions

#: a record's key for the error its reader met reading one of its members (a ``str``)
READ_ERROR = "__error__"
NONFINITE_BOXES = "non-finite region boxes"
NONFINITE_FEATURES = "non-finite region features"


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
    captions: list[str] = field(default_factory=list)  # the .txt's lines (decode fills them)


class Rejected(NamedTuple):
    """A record that is not a usable sample: its key and what is wrong (without the key)."""

    key: str  # the reader's key, "shard.tar:offset:KEY.ext"
    reason: str


def region_problem(s: Sample, feat_dim: int) -> str | None:
    """What is wrong with a sample's region arrays (shapes, sizes; O(1), no pass over the
    values), or None. The loader drops such samples (``data.on_bad_sample``); ``pad_regions``
    refuses them."""
    roi, box, cls = s.roi, s.box, s.cls
    if roi is None or box is None:
        return "region data (.roi.npy/.box.npy) missing"
    rs, bs = roi.shape, box.shape  # tuples only: this runs for every sample of every batch
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


def _float_boxes(record: dict):
    """The record's ``box.npy`` when it is a float array to test for NaN/inf, else None."""
    box = record.get("box.npy")
    return box if box is not None and box.dtype.kind == "f" else None


def decode(record: dict, *, feat_dim: int, use_regions: bool, use_images: bool,
           boxes_finite: bool = False) -> Sample | Rejected:
    """A reader's record (``{ext: bytes or array}``, ``"__key__"``, maybe ``READ_ERROR``) as a
    ``Sample`` with every ``.txt`` line in ``captions``, or ``Rejected`` with the first problem
    found. ``boxes_finite``: the caller has tested this record's boxes already."""
    key = record["__key__"]
    try:
        if READ_ERROR in record:
            raise ValueError(record[READ_ERROR])
        if use_regions and not boxes_finite:
            box = _float_boxes(record)
            if box is not None and not np.isfinite(box).all():
                raise ValueError(NONFINITE_BOXES)
        meta = parse_meta(record["json"], key)
        captions = split_captions(record["txt"], key)
        s = Sample(key=key, image_id=image_id_of(meta, key), token_ids=[],
                   width=float(meta.get("width") or 0), height=float(meta.get("height") or 0),
                   captions=captions)
        if use_regions:
            s.roi, s.box = record["roi.npy"], record["box.npy"]
            cls = record.get("cls.npy")
            s.cls = cls if cls is not None and cls.size else None
            problem = region_problem(s, feat_dim)
            if problem:
                raise ValueError(problem)
        if use_images:
            s.pixels = record["jpg"]
    except (ValueError, TypeError) as e:
        return Rejected(key, str(e).removeprefix(f"{key}: ").removeprefix(f"{key} "))
    return s


def decode_batch(records: list[dict], **kw) -> list[Sample | Rejected]:
    """``decode`` of each of ``records`` (one read batch), their boxes tested for NaN/inf at
    once (the usual case, all finite), record by record only when that test fails."""
    if kw.get("use_regions"):
        boxes = [b for b in map(_float_boxes, (r for r in records if READ_ERROR not in r))
                 if b is not None]
        kw["boxes_finite"] = not boxes or bool(
            np.isfinite(np.concatenate([b.reshape(-1) for b in boxes])).all())
    return [decode(r, **kw) for r in records]


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


def nonfinite_rows(feats: np.ndarray) -> list[int]:
    """The rows of a batch's (B, R, D) features that hold NaN/inf."""
    return [i for i in range(len(feats)) if not all_finite(feats[i])]
