"""Converters from public caption datasets to our WebDataset shards.

* ``prepare karpathy``: Karpathy's ``dataset_flickr30k.json`` / ``dataset_coco.json`` (+ the image
  folder) -> ``OUT/{train,val,test}/shard-NNNNNN.tar``. One sample per *image*; ``.txt`` holds its
  captions one per line (5 for Flickr30k/COCO), so eval keeps them together and training draws one
  per visit. ``restval`` (COCO) goes to ``train``, as in the Karpathy protocol.
* ``prepare pairs``: a web-style TSV ``image_path<TAB>caption`` -> ``OUT/shard-NNNNNN.tar``, one
  sample per line; lines naming the same image share an ``image_id`` (so ITM negatives never come
  from the same image).

Samples are assigned to shards by their position in the input, so a re-run skips every shard that
is already complete (``ShardWriter`` renames a shard into place only when it is finished).
Non-JPEG images are re-encoded to JPEG; unreadable or missing images follow ``--missing``
(``error``: stop naming the file; ``skip``: leave the sample out and count it).
"""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

from imagebert_ds.data.shards.format import shard_name
from imagebert_ds.data.shards.writer import ShardWriter

log = logging.getLogger(__name__)

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def read_image(path: Path) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height); JPEG files are kept byte for byte, others re-encoded."""
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # full decode: a truncated file fails here, not in training
        w, h = img.size
        if img.format != "JPEG":
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=95)
            data = buf.getvalue()
    return data, w, h


def write_shards(items: list[dict], out: Path, shard_size: int, missing: str,
                 desc: str) -> Counter:
    """Write ``items`` (dicts with key, image_path, captions, meta) as shards under ``out``.

    Returns counts: samples written, shards skipped (already complete), images missing/bad.
    """
    from tqdm import tqdm

    stats: Counter = Counter()
    n_shards = (len(items) + shard_size - 1) // shard_size
    bar = tqdm(total=len(items), desc=desc, unit="img")
    for sh in range(n_shards):
        chunk = items[sh * shard_size:(sh + 1) * shard_size]
        path = out / shard_name(sh)
        if path.exists():
            stats["shards_skipped"] += 1
            bar.update(len(chunk))
            continue
        w = ShardWriter(path)
        try:
            for it in chunk:
                bar.update(1)
                try:
                    jpg, width, height = read_image(it["image_path"])
                except Exception as e:  # missing file, not an image, truncated
                    msg = f"{it['image_path']}: sample '{it['key']}': cannot read image ({e})"
                    if missing == "error":
                        raise ValueError(msg) from None
                    log.warning(msg)
                    stats["images_bad"] += 1
                    continue
                meta = dict(it["meta"], width=width, height=height)
                w.write(it["key"], {"jpg": jpg, "txt": "\n".join(it["captions"]), "json": meta})
                stats["samples"] += 1
        except BaseException:
            w.abort()
            raise
        if w.count:
            w.close()
        else:  # nothing readable: no shard (an empty tar would break DALI)
            w.abort()
            log.warning("%s: no readable samples, shard not written", path)
    bar.close()
    return stats


def _clean(caption: str) -> str:
    return " ".join(caption.split())  # one line, single spaces


def prepare_karpathy(json_path: str | Path, images: str | Path, out: str | Path,
                     shard_size: int = 1000, missing: str = "error") -> dict[str, Counter]:
    """Karpathy split json + image folder -> ``out/{train,val,test}`` shards; counts per split."""
    json_path, images, out = Path(json_path), Path(images), Path(out)
    try:
        data = json.loads(json_path.read_text())
        entries = data["images"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{json_path}: not a Karpathy split file ({e})") from None
    name = data.get("dataset", json_path.stem.replace("dataset_", ""))
    per_split: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for n, img in enumerate(entries):
        try:
            split = KARPATHY_SPLITS[img["split"]]
            caps = [_clean(s["raw"]) for s in img["sentences"]]
            filename = img["filename"]
        except KeyError as e:
            raise ValueError(f"{json_path}: images[{n}] lacks {e} or has an unknown "
                             f"split") from None
        if not caps or not all(caps):
            raise ValueError(f"{json_path}: images[{n}] ({filename}) has an empty caption")
        image_id = int(img.get("cocoid", img.get("imgid", n)))
        folder = images / img["filepath"] if img.get("filepath") and \
            (images / img["filepath"]).is_dir() else images
        per_split[split].append({
            "key": f"{image_id:09d}", "image_path": folder / filename, "captions": caps,
            "meta": {"image_id": image_id, "caption_id": int(img.get("sentids", [0])[0]),
                     "caption_ids": [int(s) for s in img.get("sentids", [])],
                     "source": name, "filename": filename, "split": img["split"]}})
    return {split: write_shards(items, out / split, shard_size, missing, f"{name} {split}")
            for split, items in per_split.items() if items}


def prepare_pairs(tsv: str | Path, images: str | Path, out: str | Path, shard_size: int = 1000,
                  missing: str = "error", skip_header: bool = False,
                  source: str = "pairs") -> Counter:
    """``image_path<TAB>caption`` TSV -> shards under ``out``, one sample per line; counts."""
    tsv, images, out = Path(tsv), Path(images), Path(out)
    ids: dict[str, int] = {}
    items = []
    with open(tsv, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if skip_header and lineno == 1:
                continue
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{tsv}:{lineno}: expected 'image_path<TAB>caption'")
            rel, cap = line.split("\t", 1)
            cap = _clean(cap)
            if not cap:
                raise ValueError(f"{tsv}:{lineno}: empty caption for {rel}")
            image_id = ids.setdefault(rel, len(ids))
            items.append({"key": f"{lineno:09d}", "image_path": images / rel, "captions": [cap],
                          "meta": {"image_id": image_id, "caption_id": lineno, "source": source,
                                   "filename": rel}})
    if not items:
        raise ValueError(f"{tsv}: no image-caption lines")
    return write_shards(items, out, shard_size, missing, f"pairs {tsv.name}")
