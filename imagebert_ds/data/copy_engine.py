"""The copy engine: a batch's region features gathered from the shards into the batch buffer.

The features are the batch's bulk (a paper-shape batch: 64 x 100 x 2048 float16 = 26 MB), so
they are copied off the loader's Python thread: ``copy_threads`` pool threads (each running torch
single-threaded, ``serial_torch_pool``), one job per thread a batch (``copy_rows``: one
``torch.cat`` and one finiteness test, two releases of the GIL), into recycled host buffers
(``BufferPool``). ``CopyEngine.start`` starts a batch's jobs and returns ``FeatureCopies`` to wait
on; without copy threads the caller's thread copies. docs/data.md has the measurements behind
the thread count.
"""
from __future__ import annotations

import math
import os
import threading
import weakref

import numpy as np
import torch

from imagebert_ds.data.decode import Sample, all_finite


def copy_rows(samples: list[Sample], n_real: list[int], feats: np.ndarray,
              check_finite: bool) -> bool:
    """Each sample's first ``n_real[i]`` feature rows into ``feats[i]`` (zeros after), then
    whether they are all finite (when ``check_finite``). Runs on a pool thread: the rows that
    are raw bytes of the batch's dtype (``shards.NpyRef`` views of the shard's memory map, or
    arrays of that dtype) and the zero padding are gathered by ONE ``torch.cat`` into the
    buffer, and checked by one reduction -- two releases of the GIL per job, not a few per
    sample: a thread that must take the GIL back after each sample's read waits for every
    switch interval the loader's Python thread runs meanwhile."""
    k, R, D = feats.shape
    row_bytes = D * feats.itemsize
    flat = feats.reshape(-1).view(np.uint8)
    pieces: list[torch.Tensor] = []
    checked: dict[int, object] = {}  # one ``check_file`` per shard file: its farthest array
    for s in samples:
        roi = s.roi
        if hasattr(roi, "check_file"):
            far = checked.get(id(roi.file))
            if far is None or roi.offset + roi.nbytes > far.offset + far.nbytes:
                checked[id(roi.file)] = roi
    for roi in checked.values():  # a shard cut short after it was mapped must not fault
        roi.check_file()
    for s, n in zip(samples, n_real):
        roi = s.roi
        if hasattr(roi, "payload") and roi.direct(feats.dtype, (D,)):
            src = roi.payload(n * row_bytes)
        else:  # another dtype or order (or an in-memory array): converted here
            src = np.ascontiguousarray(np.asarray(roi)[:n], dtype=feats.dtype)
            src = src.reshape(-1).view(np.uint8)
            if not src.flags.writeable:  # torch.from_numpy warns on read-only arrays
                src = src.copy()
        pieces.append(torch.from_numpy(src))
        if n < R:
            pieces.append(_zeros((R - n) * row_bytes))
    if pieces:
        torch.cat(pieces, out=torch.from_numpy(flat))
    return all_finite(feats) if check_finite else True


_ZEROS = torch.zeros(0, dtype=torch.uint8)


def _zeros(nbytes: int) -> torch.Tensor:
    """``nbytes`` zero bytes (a view of one shared, growing zero buffer)."""
    global _ZEROS
    if len(_ZEROS) < nbytes:
        _ZEROS = torch.zeros(max(nbytes, 2 * len(_ZEROS)), dtype=torch.uint8)
    return _ZEROS[:nbytes]


def copy_threads(num_threads: int) -> int:
    """The loader's feature-copy threads for ``data.num_threads``: none (the producer thread
    copies) for 1; else ``num_threads``, but at most the CPUs this process may run on but one
    (the producer thread's): a copy thread that holds the GIL while the OS has preempted it
    (more busy threads than cores) stalls the producer (docs/data.md, "Throughput path")."""
    if num_threads <= 1:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(num_threads, (cpus or 1) - 1))


def serial_torch_pool(workers: int, prefix: str):
    """A ``ThreadPoolExecutor`` of ``workers`` threads, all started now, whose torch ops run
    single-threaded. The pool is the loader's own parallelism (``data.num_threads``); torch's
    intra-op threads under each of its copies would oversubscribe the CPUs -- and a ``torch.cat``
    of a batch's 64 features opens 64 OpenMP regions, whose workers spin between them, taking
    the CPU the loader's Python needs. OpenMP's thread count is a per-thread setting: each pool
    thread sets its own to 1 (``torch.set_num_threads`` also sets the process default that new
    threads start from), then the default is put back here, once every thread has set its own."""
    from concurrent.futures import ThreadPoolExecutor

    default = torch.get_num_threads()
    started = threading.Barrier(workers + 1)

    def init():
        torch.get_num_threads()  # this thread takes the process default now ...
        torch.set_num_threads(1)  # ... then its own count becomes 1

    pool = ThreadPoolExecutor(workers, thread_name_prefix=prefix, initializer=init)
    for _ in range(workers):  # each blocked task makes the pool start one more thread
        pool.submit(started.wait)
    started.wait()
    torch.set_num_threads(default)  # the default again (this thread's own count too)
    return pool


class BufferPool:
    """Batch-sized host buffers, reused once nothing refers to a batch any more.

    A fresh 26 MB array (a paper-shape batch of features) is new memory that the kernel zeroes
    on first touch -- as much time as the copy into it. ``tensor()`` hands out a torch tensor
    over a recycled buffer instead: the tensor holds the numpy array it was made from (so does
    every view of it, and ``.numpy()`` of any of them), and when that array is freed its
    buffer returns here. At most ``keep`` idle buffers are kept."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._idle: dict[int, list[np.ndarray]] = {}  # nbytes -> idle uint8 buffers

    def tensor(self, shape: tuple[int, ...], dtype) -> torch.Tensor:
        """An uninitialized tensor of ``shape`` and numpy ``dtype`` on a recycled buffer."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        idle = self._idle.setdefault(nbytes, [])
        try:
            raw = idle.pop()
        except IndexError:
            raw = np.empty(nbytes, np.uint8)
        arr = raw.view(dtype).reshape(shape)  # only ever reached through the tensor below
        weakref.finalize(arr, self._release, raw)
        return torch.from_numpy(arr)

    def _release(self, raw: np.ndarray) -> None:
        idle = self._idle.setdefault(raw.nbytes, [])
        if len(idle) < self.keep:
            idle.append(raw)


class FeatureCopies:
    """A batch's feature copy jobs, running on the pool or done: ``wait()`` until they are,
    ``result()`` whether the features are all finite (re-raising a job's error, e.g. a shard
    that changed on disk)."""

    def __init__(self, jobs: list):
        self._jobs = jobs  # futures, or the results of jobs run in the caller's thread

    def wait(self) -> None:
        """Until every copy has finished (an error is raised by ``result``)."""
        from concurrent.futures import wait

        wait([j for j in self._jobs if hasattr(j, "result")])

    def result(self) -> bool:
        """Once every feature row is in the buffer: whether all are finite (True when not
        checked)."""
        return all([j.result() if hasattr(j, "result") else j for j in self._jobs])


def start_copies(samples: list[Sample], n_real: list[int], feats: np.ndarray,
                 check_finite: bool, pool=None, chunk: int | None = None) -> FeatureCopies:
    """``copy_rows`` of ``samples`` into ``feats`` ((B, R, D)): on ``pool`` (an executor) in jobs
    of ``chunk`` contiguous samples (the last one shorter), or in the caller's thread in one."""
    B = len(samples)
    if pool is None:
        return FeatureCopies([copy_rows(samples, n_real, feats, check_finite)] if B else [])
    step = max(1, chunk or B)
    return FeatureCopies([pool.submit(copy_rows, samples[lo:lo + step], n_real[lo:lo + step],
                                      feats[lo:lo + step], check_finite)
                          for lo in range(0, B, step)])


class CopyEngine:
    """The loader's feature copies: ``threads`` pool threads (``copy_threads``; 0: the caller's
    thread copies), batch buffers recycled (or page-locked with ``pin_memory``)."""

    def __init__(self, threads: int = 0, pin_memory: bool = False):
        self.threads, self.pin_memory = threads, pin_memory
        self._pool = None
        self._buffers = BufferPool()

    def executor(self):
        """The thread pool (made on first use), or None without copy threads."""
        if self._pool is None and self.threads > 0:
            self._pool = serial_torch_pool(self.threads, "collate")
        return self._pool

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized host tensor for a batch's features."""
        if self.pin_memory:  # CUDA's caching host allocator recycles the page-locked blocks
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        # recycled: fresh memory of this size is zeroed by the kernel at every batch
        return self._buffers.tensor(shape, _NUMPY_DTYPES[dtype])

    def start(self, samples: list[Sample], n_real: list[int], feats: np.ndarray,
              check_finite: bool = True) -> FeatureCopies:
        """Copy (and check) a batch's features: one job per pool thread, each of a contiguous
        share of the batch (few jobs: each takes the GIL a few times)."""
        chunk = -(-len(samples) // max(1, self.threads))
        return start_copies(samples, n_real, feats, check_finite, self.executor(), chunk)

    def close(self) -> None:
        """Stop the pool's threads (after their jobs); a later batch starts a new pool."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}
