"""Process-group setup for the trainer: the same code under the deepspeed launcher, torchrun,
srun, or as a plain single process.

On a machine without CUDA, DeepSpeed's CPU accelerator is selected (``DS_ACCELERATOR=cpu``) and
ranks talk over gloo; with CUDA, NCCL. A plain ``python -m imagebert_ds.train`` without launcher
variables becomes a world of one.
"""
from __future__ import annotations

import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_env() -> None:
    """Environment defaults that must be set before ``import deepspeed``."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Slurm without the deepspeed launcher: map srun's variables onto torch.distributed's.
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed() -> tuple[int, int, torch.device]:
    """Start the process group (idempotent); returns (rank, world_size, device). A rank started
    by a launcher also starts the orphan watchdog (``watchdog.py``)."""
    from imagebert_ds.train.watchdog import start_orphan_watchdog

    start_orphan_watchdog()  # before prepare_env, which sets LOCAL_RANK for a lone process
    prepare_env()
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return rank, world, device


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (one small all-reduce; just ``flag``
    without a process group). Lets all ranks stop together when one rank finds a problem."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    t = torch.tensor([float(flag)], device=dev)
    dist.all_reduce(t)
    return bool(t.item())
