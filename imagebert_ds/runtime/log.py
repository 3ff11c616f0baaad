"""Logging of a rank: one format for every command, rank 0 at INFO and the others at WARNING;
W&B's files kept inside the run directory."""
from __future__ import annotations

import logging
import os


def setup_logging(rank: int) -> None:
    """``[rankN] HH:MM:SS logger: message`` lines; DeepSpeed's own chatter at WARNING."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def wandb_env_defaults(out_dir: str | os.PathLike) -> None:
    """Keep W&B's files inside the run directory and its console quiet."""
    os.environ.setdefault("WANDB_DIR", str(out_dir))
    os.environ.setdefault("WANDB_SILENT", "true")
