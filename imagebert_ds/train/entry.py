"""Argument parsing shared by ``imagebert-ds pretrain`` and the per-rank module entry."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from imagebert_ds.config_utils import ConfigError


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


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def run_training(config: str, overrides: list[str]) -> dict:
    """Validate the config, start the process group and run every stage."""
    from imagebert_ds.train.config import load_run_config

    cfg = load_run_config(config, overrides)  # before any process group: fails fast
    from imagebert_ds.train.distributed import init_distributed

    rank, world, device = init_distributed()
    _setup_logging(rank)
    import torch

    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    from imagebert_ds.train.trainer import Trainer

    result = Trainer(cfg, rank, world, device).run()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def rank_main(argv: list[str] | None = None) -> int:
    """One rank's main: parse, train; exit code 2 for a config error, 1 for a training error."""
    p = argparse.ArgumentParser(prog="python -m imagebert_ds.train")
    add_run_args(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = p.parse_args(argv)
    from imagebert_ds.data.shards import BadSampleError
    from imagebert_ds.train.trainer import TrainingError

    try:
        run_training(args.config, overrides_of(args))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    except BadSampleError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 1
    return 0
