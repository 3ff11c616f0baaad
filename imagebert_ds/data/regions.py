"""``prepare regions``: merge detector region features into existing shards.

Inputs, matched to a sample by its ``.json`` ``image_id`` (as a string) or its ``filename`` stem:

* the bottom-up-attention TSV (Anderson et al. 2018; tab-separated, no header, fields
  ``image_id, image_w, image_h, num_boxes, boxes, features`` and optionally ``cls_prob`` or
  ``objects``/``objects_id``): ``boxes`` base64 float32 (N, 4) pixel x1,y1,x2,y2, ``features``
  base64 float32 (N, 2048), ``cls_prob`` base64 float32 (N, C), ``objects`` base64 int64 (N,).
  Give ``--fields`` if the column order differs.
* a directory of ``<image_id>.npz`` files with arrays ``features`` (N, D), ``boxes`` (N, 4),
  optionally ``cls_prob`` (N, C) or ``objects`` (N,), and optionally scalars ``image_w`` /
  ``image_h``.

Each shard is rewritten (to a temporary name, then renamed) with ``.roi.npy`` (float16),
``.box.npy`` (float32) and ``.cls.npy`` (int64 labels, or float32 distribution) added; ``width`` /
``height`` are filled into the ``.json`` when missing. Shards whose samples all have ``.roi.npy``
already are skipped, so the command can be re-run. Samples without features are counted and left
as they are (the loader's ``missing_component`` policy or ``validate`` deals with them).
"""
from __future__ import annotations

import base64
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from imagebert_ds.data.shards.reader import iter_samples
from imagebert_ds.data.shards.writer import ShardWriter

log = logging.getLogger(__name__)

BUTD_FIELDS = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]


class TsvFeatures:
    """Random access to a bottom-up-attention TSV: one pass records each image's byte offset."""

    def __init__(self, path: Path, fields: list[str] | None = None):
        self.path, self.fields = path, fields
        self.offsets: dict[str, int] = {}
        with open(path, "rb") as f:
            pos = 0
            for line in f:
                key = line.split(b"\t", 1)[0].decode()
                if key:
                    self.offsets[key] = pos
                pos += len(line)
        self._f = open(path, "rb")

    def get(self, image_id: str) -> dict | None:
        """``{features (N, D), boxes (N, 4), image_w, image_h[, cls_prob | objects]}`` or None."""
        if image_id not in self.offsets:
            return None
        self._f.seek(self.offsets[image_id])
        cols = self._f.readline().rstrip(b"\r\n").split(b"\t")
        fields = self.fields or BUTD_FIELDS + (["cls_prob"] if len(cols) == 7 else [])
        if len(cols) < len(fields):
            raise ValueError(f"{self.path}: image_id {image_id}: {len(cols)} columns, expected "
                             f"{len(fields)} ({', '.join(fields)})")
        row = dict(zip(fields, cols))
        n = int(row["num_boxes"])
        where = f"{self.path}: image_id {image_id}"

        def arr(name, dtype, shape):
            a = np.frombuffer(base64.b64decode(row[name]), dtype=dtype)
            try:
                return a.reshape(shape)
            except ValueError:
                raise ValueError(f"{where}: field {name} has {a.size} values, expected shape "
                                 f"{shape}") from None

        out = {"boxes": arr("boxes", np.float32, (n, 4)),
               "features": arr("features", np.float32, (n, -1)),
               "image_w": float(row["image_w"]), "image_h": float(row["image_h"])}
        if "cls_prob" in row:
            out["cls_prob"] = arr("cls_prob", np.float32, (n, -1))
        for name in ("objects", "objects_id"):
            if name in row:
                out["objects"] = arr(name, np.int64, (n,))
        return out


class NpzFeatures:
    """A folder of ``<image_id>.npz`` files, looked up by file stem."""

    def __init__(self, folder: Path):
        self.files = {p.stem: p for p in folder.glob("*.npz")}
        if not self.files:
            raise FileNotFoundError(f"{folder}: no *.npz feature files")

    def get(self, image_id: str) -> dict | None:
        """The same dict as ``TsvFeatures.get`` (``x``/``bbox`` accepted as aliases), or None."""
        p = self.files.get(image_id)
        if p is None:
            return None
        with np.load(p, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        feats = d.get("features", d.get("x"))
        boxes = d.get("boxes", d.get("bbox"))
        if feats is None or boxes is None:
            raise ValueError(f"{p}: needs arrays 'features' and 'boxes' (has {sorted(d)})")
        out = {"features": feats, "boxes": boxes}
        for k in ("cls_prob", "objects"):
            if k in d:
                out[k] = d[k]
        for k in ("image_w", "image_h"):
            if k in d:
                out[k] = float(d[k])
        return out


def open_features(path: str | Path, fields: list[str] | None = None):
    """A folder -> ``NpzFeatures``, a file -> ``TsvFeatures``."""
    path = Path(path)
    if path.is_dir():
        return NpzFeatures(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature file/folder not found")
    return TsvFeatures(path, fields)


def merge_regions(features: str | Path, shards: str | Path,
                  fields: list[str] | None = None) -> Counter:
    """Add region components to every shard under ``shards``; counts merged / skipped samples."""
    from tqdm import tqdm

    src = open_features(features, fields)
    shard_paths = sorted(Path(shards).rglob("*.tar"))
    if not shard_paths:
        raise FileNotFoundError(f"{shards}: no *.tar shards")
    stats: Counter = Counter()
    for shard in tqdm(shard_paths, desc="merge regions", unit="shard"):
        samples = list(iter_samples(shard))
        if all("roi.npy" in c for _, c in samples):
            stats["shards_skipped"] += 1
            continue
        with ShardWriter(shard) as w:  # writes shard.tar.tmp, renamed over the old one
            for key, comps in samples:
                meta = json.loads(comps["json"]) if "json" in comps else {}
                ids = [str(meta.get("image_id", "")), Path(meta.get("filename", "")).stem, key]
                reg = next((r for r in (src.get(i) for i in ids if i) if r is not None), None)
                if reg is None or "roi.npy" in comps:
                    stats["already" if "roi.npy" in comps else "no_features"] += 1
                    w.write(key, comps)
                    continue
                f, b = reg["features"], reg["boxes"]
                if len(f) != len(b):
                    raise ValueError(f"{features}: image {ids[0]}: {len(f)} features vs "
                                     f"{len(b)} boxes")
                comps = dict(comps)
                comps["roi.npy"] = f.astype(np.float16)
                comps["box.npy"] = b.astype(np.float32)
                if "cls_prob" in reg:
                    comps["cls.npy"] = reg["cls_prob"].astype(np.float32)
                elif "objects" in reg:
                    comps["cls.npy"] = reg["objects"].astype(np.int64)
                if "json" in comps and not (meta.get("width") and meta.get("height")) \
                        and "image_w" in reg:
                    meta.update(width=reg["image_w"], height=reg["image_h"])
                    comps["json"] = meta
                w.write(key, comps)
                stats["merged"] += 1
    if stats["no_features"]:
        log.warning("%d sample(s) had no region features in %s", stats["no_features"], features)
    return stats
