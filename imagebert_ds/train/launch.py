"""Building ``deepspeed`` launcher command lines (used by ``pretrain --nproc``, the demo and
``evaluate --nproc``)."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import torch


def child_env(nproc: int) -> dict:
    """The environment of the launched ranks (CPU: ``DS_ACCELERATOR=cpu``)."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        # One BLAS/OpenMP pool per rank sized to its share of the cores.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def deepspeed_cmd(nproc: int, args: list[str], master_port: int | None = None,
                  module: str = "imagebert_ds.train") -> list[str]:
    """The deepspeed launcher command for ``nproc`` local ranks of ``python -m module``."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc)]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    return cmd + ["--module", module, *args]


def launch(nproc: int, args: list[str], master_port: int | None = None,
           module: str = "imagebert_ds.train") -> int:
    """Run ``module`` (default: the trainer) on ``nproc`` local ranks through the deepspeed
    launcher; returns its rc."""
    from imagebert_ds.train.distributed import _free_port

    port = master_port or _free_port()
    cmd = deepspeed_cmd(nproc, args, port, module)
    print("+ " + " ".join(cmd), flush=True)
    try:
        return subprocess.call(cmd, env=child_env(nproc))
    finally:
        remove_shm_buffers(port)


#: DeepSpeed's CPU all-reduce (``ops/csrc/cpu/comm/shm.cpp``) creates one shared-memory buffer
#: per rank, ``/dev/shm/deepspeed_allreduce_buffer_<n>_<addr>_<port>_<rank>`` (~67 MB), and never
#: unlinks it: left alone, every CPU run leaks them into RAM-backed /dev/shm.
SHM_PATTERN = "/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"


def remove_shm_buffers(port: int) -> int:
    """Unlink the CPU all-reduce buffers of the ranks that used ``port`` (after they exited);
    returns how many were removed."""
    return _unlink(glob.glob(SHM_PATTERN.format(port=int(port))))


def remove_stale_shm_buffers(min_age_s: float = 600.0) -> int:
    """Unlink every CPU all-reduce buffer older than ``min_age_s`` that no live process maps
    (leaked by finished or killed runs: DeepSpeed never removes them; a young one may belong to
    ranks still starting up); returns how many were removed."""
    import time

    now = time.time()
    paths = set()
    for path in glob.glob(SHM_PATTERN.format(port="*")):
        try:
            if now - os.path.getmtime(path) >= min_age_s:
                paths.add(path)
        except OSError:
            continue
    if not paths:
        return 0
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                paths -= {line.split(None, 5)[-1].strip().removesuffix(" (deleted)")
                          for line in f if "deepspeed_allreduce_buffer" in line}
        except OSError:  # the process ended, or is not ours to read
            continue
    return _unlink(paths)


def _unlink(paths) -> int:
    """Remove ``paths`` (already gone is fine); returns how many were removed."""
    n = 0
    for path in paths:
        try:
            os.unlink(path)
            n += 1
        except OSError:
            pass
    return n
