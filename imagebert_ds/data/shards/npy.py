"""The ``.npy`` codec of shard members: encode, decode, and zero-copy views of a batch's buffers."""
from __future__ import annotations

import functools
import io
import math

import numpy as np


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


def npy_layout(head: memoryview, total: int, where: str):
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
    offset, shape, fortran, dtype = npy_layout(b, len(b), where)
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
                offset, shape, fortran, dtype = npy_layout(b, len(b), where)
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
        offset, shape, fortran, dtype = npy_layout(memoryview(dense[0]), dense.shape[1], where)
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
