"""The environment and command line of a deepspeed-launched CPU run, shared by the tests of tests/train/."""
import os
import sys

from imagebert_ds.runtime.distributed import free_port


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline",
             WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    e.pop("CUDA_VISIBLE_DEVICES", None)
    e.pop("TRITON_INTERPRET", None)  # set by conftest for the kernel tests; the ranks use sdpa
    return e


def launcher(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(free_port()), *args]
