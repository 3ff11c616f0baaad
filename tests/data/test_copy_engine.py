"""The copy engine alone: batch buffers, its threads, their number."""
from __future__ import annotations

import numpy as np
import torch


def test_buffer_pool_reuses_a_buffer_only_once_nothing_refers_to_it():
    """A batch buffer goes back to the pool when its tensor, every view of it and every
    ``.numpy()`` of those are gone -- not while any of them is alive."""
    import gc

    from imagebert_ds.data.copy_engine import BufferPool

    pool = BufferPool(keep=2)
    t = pool.tensor((4, 3, 8), np.float16)
    ptr = t.data_ptr()
    views = [t[1], t.numpy()[2:], t.view(torch.int16)]
    del t
    while views:  # each kind of view alone keeps the buffer out of the pool
        gc.collect()
        other = pool.tensor((4, 3, 8), np.float16)
        assert other.data_ptr() != ptr
        del other, views[0]
    gc.collect()
    again = pool.tensor((4, 3, 8), np.float16)
    assert again.data_ptr() == ptr and again.shape == (4, 3, 8) and again.dtype == torch.float16
    assert pool.tensor((2, 2), np.float32).data_ptr() != ptr  # another size: another buffer


def test_serial_torch_pool_threads_run_torch_single_threaded():
    """The copy threads run their torch ops on one thread each (no OpenMP workers
    under every copy); the caller's setting and the default of new threads are unchanged."""
    import threading

    from imagebert_ds.data.copy_engine import serial_torch_pool

    before = torch.get_num_threads()
    pool = serial_torch_pool(2, "t")
    try:
        assert [f.result() for f in [pool.submit(torch.get_num_threads) for _ in range(4)]] == [1] * 4
    finally:
        pool.shutdown()
    assert torch.get_num_threads() == before
    seen = []
    th = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    th.start()
    th.join()
    assert seen == [before]


def test_copy_threads_leave_the_producer_a_cpu(monkeypatch):
    """``data.num_threads`` 1: the producer copies; else at most the CPUs but one, at least 1."""
    import os

    from imagebert_ds.data.copy_engine import copy_threads

    for cpus, asked, want in [(2, 1, 0), (2, 2, 1), (2, 8, 1), (1, 4, 1), (16, 4, 4), (4, 8, 3)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert copy_threads(asked) == want, (cpus, asked)
