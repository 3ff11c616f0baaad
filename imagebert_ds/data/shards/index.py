"""DALI index files of the shards: writing, reading, and keeping them in step with the tars.

Each ``NAME.tar`` has an index ``NAME.idx`` in DALI's ``wds2idx`` format, version ``v1.2``::

    v1.2 <num_samples>
    <ext> <data_offset> <size> <member_name> <ext> <data_offset> <size> <member_name> ...

one line per sample (its components in archive order); ``data_offset`` is the byte offset of the
member's data (not its 512-byte header) in the tar. We write it from ``tarfile``'s own offsets.
"""
from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from imagebert_ds.data.shards.format import (INDEX_VERSION, BadSampleError, index_path_for,
                                             sample_members, split_member_name)

log = logging.getLogger(__name__)


def write_index(tar_path: str | Path, idx_path: str | Path, truncated: str = "error") -> int:
    """Write the DALI v1.2 index of ``tar_path``; returns the number of samples.

    A truncated tar (a copy cut short, a disk that filled up) is refused naming the shard
    (``truncated="error"``) or indexed up to its last whole sample (``"skip"``: the sample the cut
    went through is left out, with a warning); a shard without samples is refused either way.
    """
    size = os.path.getsize(tar_path)
    lines, cut = [], None
    try:
        with tarfile.open(tar_path, "r:") as tf:
            for _, members in sample_members(tf):
                end = max(m.offset_data + m.size for m in members)
                if end > size:
                    cut = f"member {members[-1].name} ends at byte {end}, the file has {size}"
                    break
                lines.append(" ".join(f"{split_member_name(m.name)[1]} {m.offset_data} {m.size} "
                                      f"{m.name}" for m in members))
    except tarfile.TarError as e:  # a header cut in half, junk
        cut = f"{type(e).__name__}: {e}"
    if cut is None and not tar_ends_whole(tar_path, size):
        # tarfile stops quietly at a header cut in half: the last sample read may lack the
        # components that came after the cut, so it is left out
        cut = "the file does not end with tar's end-of-archive blocks"
        lines = lines[:-1]
    if cut is not None:
        if truncated == "error" or not lines:
            raise BadSampleError(f"{tar_path}: truncated or corrupt tar ({cut}); {len(lines)} "
                                 "whole sample(s) before it (data.on_bad_sample=skip keeps them)")
        log.warning("%s: truncated tar (%s): indexing its first %d whole sample(s)", tar_path,
                    cut, len(lines))
    if not lines:
        raise BadSampleError(f"{tar_path}: empty webdataset shard (no samples)")
    with open(idx_path, "w") as f:
        f.write(f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n")
    return len(lines)


def tar_ends_whole(tar_path, size: int | None = None) -> bool:
    """A whole tar is a multiple of 512 bytes and ends with (at least) two zero blocks."""
    size = os.path.getsize(tar_path) if size is None else size
    if size % 512 or size < 1024:
        return False
    with open(tar_path, "rb") as f:
        f.seek(size - 1024)
        return not any(f.read(1024))


@dataclass
class IndexEntry:
    """One line of an index file: a sample key and where each component's data lies."""

    key: str
    components: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (offset, size)


def read_index(idx_path: str | Path) -> list[IndexEntry]:
    """Parse a v1.2 index (as written by ``write_index`` or DALI's wds2idx)."""
    idx_path = Path(idx_path)
    lines = idx_path.read_text().splitlines()
    if not lines or not lines[0].startswith(INDEX_VERSION):
        raise ValueError(f"{idx_path}: not a DALI {INDEX_VERSION} index file")
    n = int(lines[0].split()[1])
    entries = []
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if len(parts) % 4:
            raise ValueError(f"{idx_path}:{lineno}: expected groups of 'ext offset size name'")
        entry = IndexEntry(key=split_member_name(parts[3])[0] if parts else "")
        for i in range(0, len(parts), 4):
            entry.components[parts[i]] = (int(parts[i + 1]), int(parts[i + 2]))
        entries.append(entry)
    if len(entries) != n:
        raise ValueError(f"{idx_path}: header says {n} samples, found {len(entries)} lines")
    return entries


def ensure_index(tar_path: Path, truncated: str = "error") -> tuple[Path, list[IndexEntry]]:
    """The shard's index and its entries, (re)written now when it is missing, older than the
    tar, unreadable, or does not fit the tar's size (a shard replaced or cut short since: DALI
    would read past its end, or miss samples). ``truncated`` as for ``write_index``."""
    idx = index_path_for(tar_path)
    if idx.exists() and idx.stat().st_mtime >= tar_path.stat().st_mtime:
        try:
            entries = read_index(idx)
        except ValueError:
            entries = None
        if entries and _fits(entries, tar_path.stat().st_size):
            return idx, entries
        log.warning("%s: index does not match the shard (changed since it was written): "
                    "rebuilding it", idx)
    write_index(tar_path, idx, truncated)
    return idx, read_index(idx)


#: a tar ends with two zero blocks, padded to tarfile's 10 KiB record
_TAR_TAIL = 2 * 512 + 10240


def _fits(entries: list[IndexEntry], size: int) -> bool:
    end = max((o + n for e in entries for o, n in e.components.values()), default=0)
    return end <= size and size - end <= _TAR_TAIL + 512
