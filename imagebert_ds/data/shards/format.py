"""The shard format: file and member naming, sample keys, the ``.json`` / ``.txt`` components.

Shard format (docs/data.md has the full description): one sample per key, components
``KEY.jpg`` (optional), ``KEY.txt`` (one caption per line), ``KEY.json`` (image_id, caption_id,
source, width, height, ...), optional ``KEY.roi.npy`` (R, 2048) float16, ``KEY.box.npy`` (R, 4)
pixel boxes, ``KEY.cls.npy`` (R,) int labels or (R, C) float distribution. Keys must not contain a
dot: the extension is everything after the first dot of the file name (the webdataset rule).
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Iterator

INDEX_VERSION = "v1.2"


class BadSampleError(ValueError):
    """A sample (or shard) that cannot be used; the message names the shard and the key."""


def split_sample_key(key: str) -> tuple[str, str]:
    """DALI's source info ``/path/shard.tar:offset:KEY.ext`` -> (shard path, sample key)."""
    parts = key.rsplit(":", 2)
    if len(parts) < 3:
        return key, key
    return parts[0], split_member_name(parts[2])[0]


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/KEY.roi.npy`` -> (``dir/KEY``, ``roi.npy``): extension after the first dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def shard_name(i: int) -> str:
    """The file name of shard ``i``: ``shard-NNNNNN.tar``."""
    return f"shard-{i:06d}.tar"


def list_shards(path: str | Path) -> list[Path]:
    """All finished ``*.tar`` shards of a dataset directory (or a single .tar), sorted."""
    p = Path(path)
    if p.is_file() and p.suffix == ".tar":
        return [p]
    if not p.exists():
        raise FileNotFoundError(f"{p}: data path does not exist")
    shards = sorted(q for q in p.glob("*.tar") if q.is_file())
    if not shards:
        raise FileNotFoundError(f"{p}: no *.tar shards in this directory")
    return shards


def index_path_for(tar_path: str | Path) -> Path:
    """``NAME.tar`` -> ``NAME.idx`` (``NAME.tar.tmp`` -> ``NAME.idx.tmp``)."""
    p = Path(tar_path)
    if p.name.endswith(".tar.tmp"):
        return p.with_name(p.name[:-len(".tar.tmp")] + ".idx.tmp")
    name = p.stem + ".idx"
    return p.with_name(name)


def sample_members(tf: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """A tar's regular files grouped into samples, in archive order: ``(key, members)``.

    Consecutive members with the same key form one sample. Hidden files (``.name``, ``._KEY.jpg``)
    are skipped, as DALI's reader skips them, so plain reading and the index see the same samples.
    """
    key, members = None, []
    for m in tf:
        if not m.isreg():
            continue
        base, _ = split_member_name(m.name)
        if not base or base.endswith("/") or Path(base).name.startswith("."):
            continue
        if base != key and members:
            yield key, members
            members = []
        key = base
        members.append(m)
    if members:
        yield key, members


# --- sample metadata (shared by the loader, the retrieval reader and validate) ----------------
def parse_meta(raw: bytes, key: str) -> dict:
    """``.json`` bytes -> dict; anything but a JSON object raises a ValueError naming ``key``."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{key}: .json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key}: .json must be a JSON object")
    return meta


def split_captions(raw: bytes, key: str) -> list[str]:
    """``.txt`` -> its non-empty lines (one caption per line)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{key}: .txt is not UTF-8") from None
    caps = [c.strip() for c in text.splitlines() if c.strip()]
    if not caps:
        raise ValueError(f"{key}: empty caption (.txt)")
    return caps


def image_id_of(meta: dict, key: str) -> int:
    """The sample's image id: ``image_id``; else img2dataset's numeric ``key``; else a stable
    63-bit hash of ``<shard file name>/<sample key>`` (``key`` is ``path.tar:...:KEY[.ext]``)."""
    if "image_id" in meta:
        v = meta["image_id"]
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        raise ValueError(f"{key}: image_id must be an integer (or a numeric string), got {v!r}")
    v = meta.get("key")
    if isinstance(v, str) and v.isdigit():
        return int(v)
    shard = Path(key.split(":", 1)[0]).name
    sample = split_member_name(key.rsplit(":", 1)[-1])[0]
    digest = hashlib.blake2b(f"{shard}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
