"""The launcher removes DeepSpeed's leaked CPU all-reduce buffers from /dev/shm."""
import mmap
import os
from pathlib import Path

import pytest

from imagebert_ds.runtime.launch import remove_shm_buffers, remove_stale_shm_buffers

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")


def fake(port: int, rank: int) -> Path:
    p = SHM / f"deepspeed_allreduce_buffer_0_127.0.0.1_{port}_{rank}"
    p.write_bytes(b"\0" * 4096)
    return p


def test_buffers_of_a_port_are_removed_others_kept():
    mine = [fake(1, 0), fake(1, 1)]
    other = fake(2, 0)
    try:
        assert remove_shm_buffers(1) == 2
        assert not any(p.exists() for p in mine) and other.exists()
    finally:
        for p in mine + [other]:
            p.unlink(missing_ok=True)


def test_stale_buffers_removed_unless_mapped_or_young():
    stale, mapped, young = fake(3, 0), fake(3, 1), fake(4, 0)
    old = os.path.getmtime(stale) - 3600
    for p in (stale, mapped):
        os.utime(p, (old, old))
    with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        try:
            remove_stale_shm_buffers()
            assert not stale.exists() and mapped.exists() and young.exists()
        finally:
            for p in (stale, mapped, young):
                p.unlink(missing_ok=True)
