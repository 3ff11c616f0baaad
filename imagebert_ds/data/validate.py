"""``validate``: decode every image and check every sample of a shard directory.

Checks per sample (each failure is reported as ``shard: key: problem``):

* ``.txt``: present, UTF-8, at least one non-empty line (missing caption);
* ``.json``: present, a JSON object; ``image_id``, when given, an integer (or numeric string);
* ``.jpg`` (when present, or always with ``--require-images``): fully decodes with PIL and really is
  a JPEG (an HTML error page saved as .jpg, a PNG, a truncated file all fail);
* region data (when present, or always with ``--require-regions``): ``.roi.npy`` (R, D) with
  ``D == --feat-dim``, ``.box.npy`` (R, 4), ``.cls.npy`` (R,) or (R, C), same R, finite values;
  ``width``/``height`` in the json so the 5-d location can be derived.

``--clean-out DIR`` writes a copy with the bad samples left out (same relative shard paths, new
indices). The exit code is 1 when anything is bad.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagebert_ds.data.shards.format import image_id_of
from imagebert_ds.data.shards.index import tar_ends_whole
from imagebert_ds.data.shards.npy import load_npy
from imagebert_ds.data.shards.reader import iter_samples
from imagebert_ds.data.shards.writer import ShardWriter


@dataclass
class Report:
    """What ``validate`` found: counts and every ``(shard, key, problem)``."""

    shards: int = 0
    samples: int = 0
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, key, problem)

    @property
    def ok(self) -> bool:
        """True when no sample had a problem."""
        return not self.bad

    def format(self) -> str:
        """One ``shard: key: problem`` line per problem, then a summary line."""
        lines = [f"{s}: {k}: {p}" for s, k, p in self.bad]
        lines.append(f"checked {self.samples} samples in {self.shards} shards: "
                     f"{len({(s, k) for s, k, _ in self.bad})} bad")
        return "\n".join(lines)


def check_image(data: bytes) -> str | None:
    """None if ``data`` is a JPEG that fully decodes, else what is wrong with it."""
    from PIL import Image

    if not data:
        return "empty .jpg"
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()
    except Exception as e:
        head = data[:64].lstrip().lower()
        if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<")):
            return "not an image (.jpg holds HTML/XML text)"
        return f"image does not decode ({type(e).__name__}: {e})"
    if fmt != "JPEG":
        return f".jpg is not a JPEG (format {fmt})"
    return None


def check_sample(comps: dict[str, bytes], feat_dim: int, require_images: bool,
                 require_regions: bool) -> list[str]:
    """Every problem of one sample (``{ext: bytes}``), empty when it is fine."""
    problems = []
    if "txt" not in comps:
        problems.append("missing caption (.txt)")
    else:
        try:
            if not comps["txt"].decode("utf-8").strip():
                problems.append("empty caption (.txt)")
        except UnicodeDecodeError:
            problems.append("caption (.txt) is not UTF-8")
    meta = {}
    if "json" not in comps:
        problems.append("missing metadata (.json)")
    else:
        try:
            meta = json.loads(comps["json"])
            if not isinstance(meta, dict):
                problems.append(".json is not a JSON object")
                meta = {}
            else:
                image_id_of(meta, "")
        except (ValueError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            problems.append(f".json invalid ({e})")
    if "jpg" in comps or require_images:
        if "jpg" not in comps:
            problems.append("missing image (.jpg)")
        else:
            p = check_image(comps["jpg"])
            if p:
                problems.append(p)
    if any(k in comps for k in ("roi.npy", "box.npy", "cls.npy")) or require_regions:
        problems += _check_regions(comps, meta, feat_dim)
    return problems


def _check_regions(comps: dict[str, bytes], meta: dict, feat_dim: int) -> list[str]:
    problems = []
    for ext in ("roi.npy", "box.npy"):
        if ext not in comps:
            problems.append(f"missing region component (.{ext})")
    if problems:
        return problems
    try:
        roi = load_npy(comps["roi.npy"], ".roi.npy")
        box = load_npy(comps["box.npy"], ".box.npy")
        cls = load_npy(comps["cls.npy"], ".cls.npy") if "cls.npy" in comps else None
    except ValueError as e:
        return [str(e)]
    if roi.ndim != 2 or roi.shape[1] != feat_dim:
        problems.append(f"wrong feature shape: .roi.npy is {roi.shape}, expected (R, {feat_dim})")
    elif not np.isfinite(roi.astype(np.float32)).all():
        problems.append(".roi.npy has NaN/inf")
    if box.ndim != 2 or box.shape[1] != 4:
        problems.append(f"wrong box shape: .box.npy is {box.shape}, expected (R, 4)")
    elif len(box) != len(roi):
        problems.append(f"{len(roi)} features but {len(box)} boxes")
    if cls is not None and (cls.ndim not in (1, 2) or len(cls) != len(roi)):
        problems.append(f"wrong class shape: .cls.npy is {cls.shape}, expected ({len(roi)},) or "
                        f"({len(roi)}, C)")
    if not (meta.get("width") and meta.get("height")):
        problems.append(".json lacks width/height (needed for box locations)")
    return problems


def validate(root: str | Path, feat_dim: int = 2048, require_images: bool = False,
             require_regions: bool = False, clean_out: str | Path | None = None) -> Report:
    """Check every sample of every shard under ``root`` (optionally writing a clean copy)."""
    from tqdm import tqdm

    root = Path(root)
    shards = [root] if root.is_file() else sorted(root.rglob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{root}: no *.tar shards")
    rep = Report()
    for shard in tqdm(shards, desc="validate", unit="shard"):
        rep.shards += 1
        rel = shard.name if root.is_file() else shard.relative_to(root)
        writer = ShardWriter(Path(clean_out) / rel) if clean_out else None
        count = 0
        if not tar_ends_whole(shard):
            rep.bad.append((str(shard), "-", "truncated tar (no end-of-archive blocks): the "
                            "last sample may be cut; --clean-out keeps the whole ones"))
        try:
            for key, comps in iter_samples(shard):
                count += 1
                rep.samples += 1
                problems = check_sample(comps, feat_dim, require_images, require_regions)
                for p in problems:
                    rep.bad.append((str(shard), key, p))
                if writer and not problems:
                    writer.write(Path(key).name, comps)
        except Exception as e:  # the tar itself is broken
            rep.bad.append((str(shard), "-", f"unreadable tar ({e})"))
        if not count:
            rep.bad.append((str(shard), "-", "empty shard (no samples): the loader leaves it "
                            "out, or stops with data.on_bad_sample=error"))
        if writer:
            writer.close() if writer.count else writer.abort()
    return rep
