"""``imagebert-ds pretrain`` and ``imagebert-ds finetune``."""
from __future__ import annotations

import argparse
from pathlib import Path

from imagebert_ds.train.entry import add_run_args, overrides_of


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` and ``finetune`` sub-commands."""
    p = sub.add_parser("pretrain", help="run the stages of a pre-training run config")
    add_run_args(p)
    p.add_argument("--nproc", type=int, default=0,
                   help="start N local ranks through the deepspeed launcher (0: run in this "
                        "process, or under an outer launcher's environment)")
    p.set_defaults(func=_start)

    f = sub.add_parser("finetune", help="retrieval fine-tuning: a run config whose model.init_from "
                                        "names a pre-trained model (configs/runs/finetune_*.yaml)")
    add_run_args(f)
    f.add_argument("--nproc", type=int, default=0, help="as for pretrain")
    f.add_argument("--init-from", default=None, metavar="DIR",
                   help="the pre-trained model (save_pretrained folder or run directory); "
                        "overrides model.init_from")
    f.set_defaults(func=_finetune)


def _finetune(args) -> int:
    """``pretrain`` for a run that starts from a pre-trained model (``model.init_from``)."""
    from imagebert_ds.config_utils import ConfigError
    from imagebert_ds.train.config import load_run_config

    if args.init_from:
        args.overrides = [*args.overrides, f"model.init_from={Path(args.init_from).resolve()}"]

    if not load_run_config(args.config, overrides_of(args)).model.init_from:
        raise ConfigError(f"{args.config}: fine-tuning needs model.init_from (or --init-from): "
                          "the pre-trained model to start from")
    return _start(args)


def _start(args):
    """Train in this process, or launch ``--nproc`` local ranks (their rc is returned)."""
    from imagebert_ds.train.entry import run_training

    overrides = overrides_of(args)
    if args.nproc > 0:
        from imagebert_ds.runtime.launch import launch
        from imagebert_ds.runtime.lock import RunLock
        from imagebert_ds.train.config import load_run_config

        cfg = load_run_config(args.config, overrides)  # fail here, not in N ranks
        RunLock(cfg.run.out_dir).check()  # a live run holds out_dir: refuse before launching
        fwd = ["--config", args.config] + [a for o in overrides for a in ("--set", o)]
        return launch(args.nproc, fwd)
    run_training(args.config, overrides)
