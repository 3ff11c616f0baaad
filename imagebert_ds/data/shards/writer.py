"""Writing a shard: the tar under a temporary name, its DALI index built alongside."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from imagebert_ds.data.shards.format import INDEX_VERSION, index_path_for
from imagebert_ds.data.shards.npy import npy_bytes


class ShardWriter:
    """Writes one tar shard under a temporary name and renames it (and its index) when closed.

    A crash mid-write leaves only ``*.tar.tmp`` behind, so a re-run sees the shard as unfinished.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        # USTAR: plain 512-byte headers, no pax extension records, so offsets are what tar gives.
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self._keys: set[str] = set()
        self._index: list[str] = []  # index lines, built while writing (no second pass)

    def write(self, key: str, components: dict[str, bytes | str | dict | np.ndarray]) -> None:
        """Add one sample. ``components`` maps extension -> bytes / str / dict (json) / array."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"{self.path}: sample key {key!r} must be non-empty, without '.' "
                             f"or '/'")
        if key in self._keys:
            raise ValueError(f"{self.path}: duplicate sample key {key!r}")
        self._keys.add(key)
        line = []
        for ext, value in components.items():
            if isinstance(value, np.ndarray):
                data = npy_bytes(value)
            elif isinstance(value, dict):
                data = json.dumps(value, sort_keys=True).encode()
            elif isinstance(value, str):
                data = value.encode("utf-8")
            else:
                data = bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0  # deterministic bytes: same inputs -> identical shard
            self._tar.addfile(info, io.BytesIO(data))
            # after addfile the archive offset is just past the data, padded to 512-byte blocks
            data_offset = self._tar.offset - (len(data) + 511) // 512 * 512
            line += [ext, str(data_offset), str(len(data)), info.name]
        self._index.append(" ".join(line))
        self.count += 1

    def close(self) -> None:
        """Finish: write the index, rename both into place (an empty shard is an error)."""
        self._tar.close()
        if not self.count:
            self.tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: refusing to write an empty shard")
        idx_tmp = index_path_for(self.tmp)
        with open(idx_tmp, "w") as f:
            f.write(f"{INDEX_VERSION} {self.count}\n" + "\n".join(self._index) + "\n")
        os.replace(idx_tmp, index_path_for(self.path))
        os.replace(self.tmp, self.path)  # the tar last: its presence means "finished"

    def abort(self) -> None:
        """Give up: delete the temporary tar, leave no shard behind."""
        self._tar.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
