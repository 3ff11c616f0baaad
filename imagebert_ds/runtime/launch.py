"""Building and running ``deepspeed`` launcher command lines (used by ``pretrain --nproc``, the
demo and ``evaluate --nproc``); the launched processes end with this one (``watchdog.py``)."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import threading

import torch

from imagebert_ds.runtime.watchdog import GRACE_ENV, PARENT_ENV, set_parent_death_signal


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
    launcher; returns its rc (128 + the signal when stopped by SIGTERM / Ctrl-C)."""
    from imagebert_ds.runtime.distributed import free_port

    port = master_port or free_port()
    cmd = deepspeed_cmd(nproc, args, port, module)
    print("+ " + " ".join(cmd), flush=True)
    env = {**child_env(nproc), PARENT_ENV: str(os.getpid())}  # the ranks' watchdog watches us
    # Own process group (so a signal reaches launcher and ranks alike) and a parent-death signal:
    # killing this process, even with SIGKILL, ends the launch (``watchdog.py``).
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=set_parent_death_signal)
    interrupts = []

    def forward(signum, frame):  # SIGTERM / Ctrl-C: the ranks checkpoint and stop; twice: kill
        interrupts.append(signum)
        sig = signal.SIGKILL if len(interrupts) > 1 else signal.SIGTERM
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    main = threading.current_thread() is threading.main_thread()  # signals: main thread only
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        rc = proc.wait()
        if interrupts:  # the launcher is gone; wait for its ranks (checkpointing), then return
            _wait_for_group(proc.pid, timeout_s=float(os.environ.get(GRACE_ENV, "120")))
            # stopped by a signal: the ranks checkpointed and exited 0, but the work is not done
            return 128 + interrupts[0]
        return rc
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        remove_shm_buffers(port)


def _wait_for_group(pgid: int, timeout_s: float) -> None:
    """Until no process of group ``pgid`` is left; SIGKILL what remains after ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


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
