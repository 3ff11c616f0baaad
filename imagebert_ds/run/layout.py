"""The run directory's layout: its paths and markers.

::

    <run>/resolved_config.yaml              # the run's record (record.py)
    <run>/run.lock                          # held by a live run (runtime/lock.py)
    <run>/metrics.jsonl, retrieval.json
    <run>/<stage>/checkpoints/latest, stepNNNNNNNN/...   # checkpoint.py
    <run>/<stage>/final/                    # save_pretrained export; COMPLETE once whole
"""
from __future__ import annotations

import os
from pathlib import Path

RUN_CONFIG = "resolved_config.yaml"  # the run's record (record.py)
COMPLETE = "COMPLETE"  # marks a finished export or checkpoint tag
FINAL = "final"
CHECKPOINTS = "checkpoints"


def stage_dir(run_dir: str | os.PathLike, stage: str) -> Path:
    """``<run>/<stage>``: the stage's checkpoints and ``final/`` export."""
    return Path(run_dir) / stage


def is_model_dir(p: Path) -> bool:
    """A ``save_pretrained`` folder: ``config.yaml`` + ``model.safetensors``."""
    return (p / "config.yaml").is_file() and (p / "model.safetensors").is_file()


def is_complete(p: Path) -> bool:
    """An export or checkpoint tag that was written whole."""
    return (p / COMPLETE).is_file()


def mark_complete(p: Path, text: str) -> None:
    """Mark the export or tag ``p`` whole (the last file written into it)."""
    (p / COMPLETE).write_text(text)
