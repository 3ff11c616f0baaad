"""Synthetic webdataset shards at the paper's shape, for the loader and trainer benchmarks.

Written the way a user's own converter would write them: plain ``tarfile`` (its default format),
no ``.idx`` index (the loader builds one on first use), so the benchmarks read a *foreign*
webdataset. Per sample ``KEY``:

  KEY.roi.npy   (R, 2048) float16  RoI features (ImageBERT §3.2: R = 100 regions per image)
  KEY.box.npy   (R, 4) float32     pixel boxes x1, y1, x2, y2 inside the 640 x 480 image
  KEY.cls.npy   (R,) int64         detector classes in [0, 1600) (Visual Genome)
  KEY.txt       one caption of 5-30 words
  KEY.json      {"image_id", "width": 640, "height": 480}

and, for an ``images`` dataset, ``KEY.jpg`` instead of the region arrays: a 640 x 480 JPEG of
smooth colour noise plus fine grain (PIL, quality 90; ~110 KB, about a COCO photo's size).

Datasets are cached under ``benchmarks/.cache/<spec name>/`` (git-ignored) and written once; a
``SPEC.json`` written last marks a finished dataset.
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / "benchmarks" / ".cache"
FORMAT_VERSION = 1  # bump when the bytes written for a spec change
WIDTH, HEIGHT = 640, 480
NUM_CLASSES = 1600
WORDS = ("a man woman child dog cat bird horse car bus train bike boat plane street road field "
         "beach park table chair room kitchen window door tree grass water sky cloud snow hill "
         "building house city sign light pole fence wall floor plate food pizza cake bowl cup "
         "phone laptop book bag ball kite umbrella hat shirt jacket red blue green white black "
         "yellow brown small large old young two three some many is are sitting standing "
         "walking running riding holding looking playing eating lying parked flying on in at "
         "with near next to of under behind front top side the and while").split()


@dataclass(frozen=True)
class ShardSpec:
    """What to write: shard count and size, regions per sample, feature width, or JPEGs."""
    shards: int
    per_shard: int
    regions: int = 100
    feat_dim: int = 2048
    images: bool = False  # jpg + txt + json only (no region arrays)
    seed: int = 0

    @property
    def name(self) -> str:
        """The cache folder name: every field that changes the bytes."""
        kind = "images" if self.images else f"regions-r{self.regions}-d{self.feat_dim}"
        return f"v{FORMAT_VERSION}-{kind}-{self.shards}x{self.per_shard}-s{self.seed}"

    @property
    def num_samples(self) -> int:
        """Samples over all shards."""
        return self.shards * self.per_shard


def caption(rng: np.random.Generator) -> str:
    """5-30 words from a small everyday vocabulary (every word is in the WordPiece vocab)."""
    return " ".join(rng.choice(WORDS, size=int(rng.integers(5, 31))))


def jpeg_bytes(rng: np.random.Generator) -> bytes:
    """A 640 x 480 RGB JPEG: bicubic-upsampled colour noise + grain, PIL quality 90."""
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (HEIGHT // 16, WIDTH // 16, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((WIDTH, HEIGHT), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
    img = Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def region_arrays(rng: np.random.Generator, regions: int, feat_dim: int):
    """(R, D) float16 non-negative features (post-ReLU like a detector's), boxes, classes."""
    roi = np.abs(rng.standard_normal((regions, feat_dim), dtype=np.float32)).astype(np.float16)
    x1 = rng.uniform(0, WIDTH - 16, regions)
    y1 = rng.uniform(0, HEIGHT - 16, regions)
    x2 = x1 + rng.uniform(8, WIDTH, regions).clip(max=WIDTH - x1)
    y2 = y1 + rng.uniform(8, HEIGHT, regions).clip(max=HEIGHT - y1)
    box = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    cls = rng.integers(0, NUM_CLASSES, regions, dtype=np.int64)
    return roi, box, cls


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_dataset(spec: ShardSpec, out: Path) -> None:
    """Write ``spec``'s shards into ``out`` (``shard-NNNNNN.tar``, no index files)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    for s in range(spec.shards):
        with tarfile.open(out / f"shard-{s:06d}.tar", "w") as tf:  # tarfile's default format
            for i in range(spec.per_shard):
                key = f"{s:04d}{i:06d}"
                if spec.images:
                    _add(tf, f"{key}.jpg", jpeg_bytes(rng))
                else:
                    roi, box, cls = region_arrays(rng, spec.regions, spec.feat_dim)
                    _add(tf, f"{key}.roi.npy", _npy(roi))
                    _add(tf, f"{key}.box.npy", _npy(box))
                    _add(tf, f"{key}.cls.npy", _npy(cls))
                _add(tf, f"{key}.txt", caption(rng).encode())
                meta = {"image_id": s * spec.per_shard + i, "width": WIDTH, "height": HEIGHT}
                _add(tf, f"{key}.json", json.dumps(meta).encode())


def ensure_dataset(spec: ShardSpec, root: Path | str | None = None) -> Path:
    """The dataset folder of ``spec`` under ``root`` (default ``benchmarks/.cache``), written
    now unless a finished copy (``SPEC.json``) is already there."""
    d = Path(root or CACHE_DIR) / spec.name
    if (d / "SPEC.json").is_file():
        return d
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_dataset(spec, tmp)
    (tmp / "SPEC.json").write_text(json.dumps(asdict(spec)) + "\n")
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return d


def drop_indices(d: Path) -> None:
    """Delete the ``.idx`` files a loader wrote, so the next loader indexes a foreign dataset."""
    for idx in d.glob("*.idx"):
        idx.unlink()


def dataset_bytes(d: Path) -> int:
    """Total size of the dataset's tar shards."""
    return sum(p.stat().st_size for p in d.glob("*.tar"))
