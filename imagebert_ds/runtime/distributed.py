"""Process-group setup: the same code under the deepspeed launcher, torchrun, srun, or as a plain
single process; and the few collectives the runtime needs (``any_rank``, ``barrier``).

Without CUDA, DeepSpeed's CPU accelerator is selected (``DS_ACCELERATOR=cpu``) and ranks talk over
gloo; with CUDA, NCCL. Under plain ``srun`` the Slurm variables are mapped onto torch.distributed's;
a process without launcher variables becomes a world of one.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_env() -> None:
    """Environment defaults that must be set before ``import deepspeed`` or a process group."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(deepspeed: bool = True) -> tuple[int, int, torch.device]:
    """Start the process group (idempotent); returns (rank, world_size, device).

    ``deepspeed``: through ``deepspeed.init_distributed`` (the trainer's engine needs its comm
    layer), else plain ``torch.distributed`` (evaluation), and only for a world of more than one.
    A rank started by a launcher also starts the orphan watchdog (``watchdog.py``).
    """
    from imagebert_ds.runtime.watchdog import start_orphan_watchdog

    start_orphan_watchdog()  # before prepare_env, which sets LOCAL_RANK for a lone process
    prepare_env()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if deepspeed:
            import deepspeed as ds

            ds.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        elif int(os.environ["WORLD_SIZE"]) > 1:
            dist.init_process_group(backend, init_method="env://")
    rank, world = get_rank(), get_world_size()
    return rank, world, torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Wait for every rank, then tear the process group down (nothing without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (one small all-reduce; just ``flag``
    without a process group). Lets all ranks stop together when one rank finds a problem."""
    if get_world_size() == 1:
        return flag
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    t = torch.tensor([float(flag)], device=dev)
    dist.all_reduce(t)
    return bool(t.item())
