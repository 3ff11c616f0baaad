"""Argument parsing shared by ``imagebert-ds pretrain`` and the per-rank module entry."""
from __future__ import annotations

import argparse
import os

from imagebert_ds.runtime.errors import run_command


def add_run_args(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--set KEY=VALUE`` (repeatable) and ``--resume``."""
    p.add_argument("--config", required=True, help="run config, e.g. configs/runs/toy.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set stages.0.steps=100 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint (same as run.resume=auto)")


def overrides_of(args) -> list[str]:
    """The ``--set`` overrides, plus ``run.resume=auto`` for ``--resume``."""
    return list(args.overrides) + (["run.resume=auto"] if args.resume else [])


def run_training(config: str, overrides: list[str]) -> dict:
    """Validate the config, start the process group and run every stage."""
    from imagebert_ds.train.config import load_run_config

    cfg = load_run_config(config, overrides)  # before any process group: fails fast
    from imagebert_ds.runtime.distributed import init_distributed, shutdown
    from imagebert_ds.runtime.log import setup_logging

    rank, world, device = init_distributed()
    setup_logging(rank)
    import torch

    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    from imagebert_ds.train.trainer import Trainer

    result = Trainer(cfg, rank, world, device).run()
    shutdown()
    return result


def rank_main(argv: list[str] | None = None) -> int:
    """One rank's main: parse, train; exit code 2 for a config error, 1 for a training error."""
    p = argparse.ArgumentParser(prog="python -m imagebert_ds.train")
    add_run_args(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = p.parse_args(argv)
    return run_command(lambda: run_training(args.config, overrides_of(args)), "pretrain")
