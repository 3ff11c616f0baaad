"""WebDataset tar shards: writing (atomically), DALI index files, listing and plain reading.

Shard format (docs/data.md has the full description): one sample per key, components
``KEY.jpg`` (optional), ``KEY.txt`` (one caption per line), ``KEY.json`` (image_id, caption_id,
source, width, height, ...), optional ``KEY.roi.npy`` (R, 2048) float16, ``KEY.box.npy`` (R, 4)
pixel boxes, ``KEY.cls.npy`` (R,) int labels or (R, C) float distribution. Keys must not contain a
dot: the extension is everything after the first dot of the file name (the webdataset rule).

Each ``NAME.tar`` has an index ``NAME.idx`` in DALI's ``wds2idx`` format, version ``v1.2``::

    v1.2 <num_samples>
    <ext> <data_offset> <size> <member_name> <ext> <data_offset> <size> <member_name> ...

one line per sample (its components in archive order); ``data_offset`` is the byte offset of the
member's data (not its 512-byte header) in the tar. We write it from ``tarfile``'s own offsets.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import mmap
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

INDEX_VERSION = "v1.2"
log = logging.getLogger(__name__)


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


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as the bytes of a ``.npy`` file (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes, where: str) -> np.ndarray:
    """Bytes of a ``.npy`` file -> array; junk raises a ValueError naming ``where``."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/EOFError/OSError for junk
        raise ValueError(f"{where}: not a valid .npy array ({e})") from None


def _npy_layout(head: memoryview, total: int, where: str):
    """(payload offset, shape, fortran, dtype) of a ``.npy`` of ``total`` bytes whose first
    bytes are ``head``; junk, pickles and a payload shorter than the shape raise, naming
    ``where``."""
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise ValueError(f"{where}: not a valid .npy array (no .npy magic)")
    if head[6] == 1:
        offset = 10 + int.from_bytes(head[8:10], "little")
    else:
        offset = 12 + int.from_bytes(head[8:12], "little") if len(head) >= 12 else len(head) + 1
    if offset > len(head):
        raise ValueError(f"{where}: not a valid .npy array (truncated header)")
    try:
        shape, fortran, dtype, nbytes = _npy_header(bytes(head[:offset]))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if total - offset < nbytes:
        raise ValueError(f"{where}: .npy is truncated ({total - offset} bytes of data for "
                         f"shape {shape} {dtype})")
    return offset, shape, fortran, dtype


def npy_view(buf: np.ndarray, where: str) -> np.ndarray:
    """The array stored in a ``.npy`` file's bytes ``buf`` (a uint8 array), as a zero-copy view.

    The header is parsed by ``numpy.lib.format`` (versions 1-3) once per distinct header (a
    dataset has a handful: same dtype, few shapes); object dtypes (pickles) and a payload
    shorter than the header's shape are refused. Errors name ``where``.
    """
    b = memoryview(buf)
    offset, shape, fortran, dtype = _npy_layout(b, len(b), where)
    flat = np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=offset)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def npy_views(bufs: list[np.ndarray], where: str, bad: dict[int, str]) -> list:
    """``npy_view`` of each of ``bufs`` (one component of a DALI batch), the header parsed
    once while it repeats (a dataset's arrays share a few headers): the view, or for a buffer
    that is not a valid ``.npy`` the buffer itself, with the error put in ``bad[i]``."""
    out, head, layout = [], None, None
    for i, buf in enumerate(bufs):
        b = memoryview(buf)
        if head is not None and b[:len(head)] == head and len(b) - len(head) >= layout[3]:
            shape, fortran, dtype, _, count = layout
        else:
            try:
                offset, shape, fortran, dtype = _npy_layout(b, len(b), where)
            except ValueError as e:  # the loader skips the sample or stops, per on_bad_sample
                bad[i] = str(e)
                out.append(buf)
                continue
            count = math.prod(shape)
            head, layout = bytes(b[:offset]), (shape, fortran, dtype, count * dtype.itemsize,
                                               count)
        flat = np.frombuffer(buf, dtype=dtype, count=count, offset=len(head))
        out.append(flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape))
    return out


def npy_column(dense: np.ndarray, where: str, bad: dict[int, str]) -> list:
    """``npy_views`` of the rows of ``dense`` ((N, nbytes) uint8: one component of a DALI batch
    whose buffers all have the same size, e.g. every sample's 100 boxes), parsed at once when
    they share the first row's header (the usual case: one reshape, no per-row parse); rows
    with another header are parsed one by one. The views share ``dense``'s memory."""
    if not len(dense):
        return []
    try:
        offset, shape, fortran, dtype = _npy_layout(memoryview(dense[0]), dense.shape[1], where)
    except ValueError:
        return npy_views(list(dense), where, bad)
    same = (dense[:, :offset] == dense[0, :offset]).all(1)
    if fortran or not same.all():
        return npy_views(list(dense), where, bad)
    count = math.prod(shape)
    payload = dense[:, offset:offset + count * dtype.itemsize]
    return list(np.ascontiguousarray(payload).view(dtype).reshape((len(dense),) + shape))


@functools.lru_cache(maxsize=256)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, payload bytes) of a ``.npy`` header (magic included)."""
    import numpy.lib.format as npf

    f = io.BytesIO(head)
    try:
        major, _ = npf.read_magic(f)
        read = npf.read_array_header_1_0 if major == 1 else npf.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except Exception as e:  # numpy raises ValueError for junk headers
        raise ValueError(f"not a valid .npy array ({e})") from None
    if dtype.hasobject:
        raise ValueError(f".npy holds Python objects (dtype {dtype}); refusing to unpickle")
    return tuple(shape), bool(fortran), dtype, math.prod(shape) * dtype.itemsize


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
            off, shape, fortran, dtype = _npy_layout(head, member_size, self.where)
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


def index_path_for(tar_path: str | Path) -> Path:
    """``NAME.tar`` -> ``NAME.idx`` (``NAME.tar.tmp`` -> ``NAME.idx.tmp``)."""
    p = Path(tar_path)
    if p.name.endswith(".tar.tmp"):
        return p.with_name(p.name[:-len(".tar.tmp")] + ".idx.tmp")
    name = p.stem + ".idx"
    return p.with_name(name)


def _sample_members(tf: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
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
            for _, members in _sample_members(tf):
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


def iter_samples(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Plain sequential reading: yields (key, {ext: bytes}) in archive order."""
    with tarfile.open(tar_path, "r:") as tf:
        for key, members in _sample_members(tf):
            comps = {}
            for m in members:
                f = tf.extractfile(m)
                comps[split_member_name(m.name)[1]] = f.read() if f is not None else b""
            yield key, comps


def shard_name(i: int) -> str:
    """The file name of shard ``i``: ``shard-NNNNNN.tar``."""
    return f"shard-{i:06d}.tar"


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
