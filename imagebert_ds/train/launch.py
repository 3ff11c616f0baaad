"""Building ``deepspeed`` launcher command lines (used by ``pretrain --nproc``, the demo and
``evaluate --nproc``)."""
from __future__ import annotations

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

    cmd = deepspeed_cmd(nproc, args, master_port or _free_port(), module)
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=child_env(nproc))
