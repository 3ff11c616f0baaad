"""Reading shards: zero-copy ``.npy`` members of memory-mapped shards; plain sequential reads."""
from __future__ import annotations

import io
import math
import mmap
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from imagebert_ds.data.shards.format import sample_members, split_member_name
from imagebert_ds.data.shards.index import IndexEntry, read_index
from imagebert_ds.data.shards.npy import npy_layout


class NpyRef:
    """A ``.npy`` member of a shard, not copied yet: shape and dtype from its header; the payload
    is a zero-copy view of the shard's memory map (``payload``: the collator gathers a batch's
    features from those views into the batch buffer in one call, one copy from the page cache).

    Stands in for the array where the loader only copies it into a batch (``pad_regions``):
    ``shape``, ``ndim``, ``dtype``, ``len()``; ``read_into(out)`` fills ``out`` with the first
    ``len(out)`` rows; ``np.asarray(ref)`` gives the whole array. It holds its shard's open file
    and map, so it stays valid however many shards ``ShardFiles`` opened and closed since.
    """

    __slots__ = ("file", "map", "offset", "nbytes", "shape", "dtype", "fortran", "_where")
    HEAD = 4096  # a .npy header (magic + dict, padded to 64) is far smaller

    def __init__(self, file: io.FileIO, mapped: np.ndarray, member_offset: int, member_size: int,
                 where, layout: tuple | None = None):
        """``where``: a string, or a (shard, key, ext) tuple made into one on error only;
        ``layout``: (payload offset in the member, shape, fortran, dtype, payload bytes) when
        the caller has parsed this member's header already (``ShardFiles``' header cache)."""
        self.file, self.map, self._where = file, mapped, where  # the file closes with its last ref
        if member_offset + member_size > len(mapped):
            raise ValueError(f"{self.where}: the member ends past the shard's end "
                             f"({len(mapped)} bytes): the shard changed on disk (rebuild its index)")
        if layout is None:
            head = memoryview(mapped[member_offset:member_offset + min(member_size, self.HEAD)])
            off, shape, fortran, dtype = npy_layout(head, member_size, self.where)
            layout = (off, shape, fortran, dtype, math.prod(shape) * dtype.itemsize)
        off, self.shape, self.fortran, self.dtype, self.nbytes = layout
        self.offset = member_offset + off

    @property
    def where(self) -> str:
        """``shard:key (.ext)``, for error messages."""
        w = self._where
        return w if isinstance(w, str) else f"{w[0]}:{w[1]} (.{w[2]})"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def direct(self, dtype, trailing: tuple[int, ...]) -> bool:
        """Whether rows can be copied as raw bytes into a C-contiguous ``dtype`` buffer whose
        rows have shape ``trailing`` (same dtype and row shape, C order)."""
        return not self.fortran and self.dtype == dtype and self.shape[1:] == tuple(trailing)

    def payload(self, nbytes: int | None = None) -> np.ndarray:
        """The first ``nbytes`` bytes of the array's data (all by default): a uint8 view of the
        shard's memory map. Call ``check_file`` before reading it: a shard cut short on disk
        after it was mapped would fault."""
        n = self.nbytes if nbytes is None else nbytes
        return self.map[self.offset:self.offset + n]

    def check_file(self) -> None:
        """Raise (naming shard and key) if the shard is now shorter than this array's end."""
        size = os.fstat(self.file.fileno()).st_size
        if size < self.offset + self.nbytes:
            raise ValueError(f"{self.where}: the shard is now {size} bytes, shorter than the "
                             "array's end: the shard changed on disk")

    def read_into(self, out: np.ndarray) -> None:
        """Fill ``out`` ((n, ...) with the array's trailing shape, n <= len) with the first n
        rows: a byte copy when ``out`` is C-contiguous with the array's dtype and order, else a
        converting assignment."""
        self.check_file()
        if self.direct(out.dtype, out.shape[1:]) and out.flags.c_contiguous:
            out.reshape(-1).view(np.uint8)[...] = self.payload(out.nbytes)
        else:
            out[...] = np.asarray(self)[:len(out)]

    def __array__(self, dtype=None, copy=None):
        self.check_file()
        flat = self.payload().view(self.dtype).copy()
        arr = flat.reshape(self.shape[::-1]).T if self.fortran else flat.reshape(self.shape)
        return arr if dtype is None else arr.astype(dtype, copy=False)


def _bytes_at(mapped: np.ndarray, start: int, stop: int) -> bytes:
    """``mapped[start:stop]`` as bytes; sliced from the mmap itself when ``mapped`` is a view
    of one (no numpy view in between: this runs for every sample's header)."""
    raw = mapped.base
    return raw[start:stop] if isinstance(raw, mmap.mmap) else mapped[start:stop].tobytes()


class ShardFiles:
    """Open, memory-mapped shard files and their index entries by key, for ``NpyRef`` reads. A
    few are kept open here (least recently used ones are let go); a file and its map close
    once neither this cache nor an ``NpyRef`` holds them, so a batch may span any number of
    shards."""

    def __init__(self, index_of: dict[str, Path], max_open: int = 8):
        self.index_of = {str(k): Path(v) for k, v in index_of.items()}
        self.max_open = max_open
        self._open: dict[str, tuple[io.FileIO, np.ndarray, dict[str, IndexEntry]]] = {}
        # .npy headers seen, by their bytes: a dataset's arrays share a few (same dtype, shapes)
        self._layouts: dict[bytes, tuple] = {}
        self._head_len = 0  # the length of the last header parsed (the usual one)

    def entry(self, shard: str) -> tuple[io.FileIO, np.ndarray, dict[str, IndexEntry]]:
        """(open file, its read-only memory map as uint8, key -> index entry) of ``shard``
        (opened, mapped and indexed on first use)."""
        got = self._open.pop(shard, None)
        if got is None:
            if shard not in self.index_of:
                raise ValueError(f"{shard}: not a shard of this source")
            f = io.FileIO(shard, "r")
            size = os.fstat(f.fileno()).st_size
            # copy-on-write: a writable view for torch.from_numpy; nothing ever writes to it
            mapped = (np.frombuffer(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY),
                                    np.uint8) if size else np.zeros(0, np.uint8))
            got = (f, mapped, {e.key: e for e in read_index(self.index_of[shard])})
            while len(self._open) >= self.max_open:
                del self._open[next(iter(self._open))]  # closes when no NpyRef holds it
        self._open[shard] = got  # most recently used last
        return got

    def npy(self, shard: str, key: str, ext: str) -> NpyRef | None:
        """The ``ext`` member of sample ``key`` of ``shard``, as an ``NpyRef``; None when the
        sample has no such member."""
        return self._ref(self.entry(shard), shard, key, ext)

    def npy_refs(self, keys: list[tuple[str, str]], ext: str) -> list:
        """``npy(shard, key, ext)`` for each (shard, key) of ``keys`` (a DALI batch's samples,
        mostly of one shard): each an ``NpyRef``, None (no such member) or the ``ValueError``
        that ``npy`` would raise; the shard's entry is looked up once per run of equal shards."""
        out, last, got = [], None, None
        for shard, key in keys:
            try:
                if shard != last:
                    got, last = self.entry(shard), shard
                out.append(self._ref(got, shard, key, ext))
            except ValueError as e:
                out.append(e)
        return out

    def _ref(self, got: tuple, shard: str, key: str, ext: str) -> NpyRef | None:
        """``npy`` on the shard's ``entry`` ``got``."""
        file, mapped, entries = got
        e = entries.get(key)
        if e is None:
            raise ValueError(f"{shard}:{key} (.{ext}): key not in the shard's index (rebuild it: "
                             "delete the .idx)")
        if ext not in e.components:
            return None
        off, size = e.components[ext]
        where = (shard, key, ext)
        # a header whose bytes were parsed before (its length field is among them) is that one
        n = self._head_len
        layout = self._layouts.get(_bytes_at(mapped, off, off + n)) if n <= size else None
        if layout is not None and size - n < layout[4]:
            layout = None  # a truncated payload: the full parse names the problem
        ref = NpyRef(file, mapped, off, size, where, layout)
        if layout is None and len(self._layouts) < 256:
            n = ref.offset - off
            self._layouts[_bytes_at(mapped, off, off + n)] = (n, ref.shape, ref.fortran,
                                                              ref.dtype, ref.nbytes)
            self._head_len = n
        return ref

    def close(self) -> None:
        """Let go of the cached files (each closes once no ``NpyRef`` holds it)."""
        self._open.clear()


def iter_samples(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Plain sequential reading: yields (key, {ext: bytes}) in archive order."""
    with tarfile.open(tar_path, "r:") as tf:
        for key, members in sample_members(tf):
            comps = {}
            for m in members:
                f = tf.extractfile(m)
                comps[split_member_name(m.name)[1]] = f.read() if f is not None else b""
            yield key, comps
