"""``imagebert-ds pretrain`` and ``imagebert-ds demo``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imagebert_ds.config_utils import ConfigError

DEMO_CONFIG = "configs/runs/toy.yaml"
TARGET_T2I_R1 = 80.0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` and ``demo`` sub-commands."""
    from imagebert_ds.train.entry import add_run_args

    p = sub.add_parser("pretrain", help="run the stages of a pre-training run config")
    add_run_args(p)
    p.add_argument("--nproc", type=int, default=0,
                   help="start N local ranks through the deepspeed launcher (0: run in this "
                        "process, or under an outer launcher's environment)")
    p.set_defaults(func=_pretrain)

    d = sub.add_parser("demo", help="toy data -> 2 pre-training stages -> zero-shot retrieval")
    d.add_argument("--out", default="demo_out", help="output directory (data, run, retrieval.json)")
    d.add_argument("--nproc", type=int, default=None,
                   help="ranks (default: number of GPUs, or 2 CPU ranks without a GPU)")
    d.add_argument("--config", default=DEMO_CONFIG)
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--train", type=int, default=None, help="toy stage-1 size (default: generator's)")
    d.add_argument("--test", type=int, default=100, help="toy test images")
    d.set_defaults(func=_demo)


def _pretrain(args) -> int:
    from imagebert_ds.train.config import load_run_config
    from imagebert_ds.train.entry import overrides_of, run_training
    from imagebert_ds.train.trainer import TrainingError

    overrides = overrides_of(args)
    try:
        if args.nproc > 0:
            load_run_config(args.config, overrides)  # fail here, not in N ranks
            from imagebert_ds.train.launch import launch

            fwd = ["--config", args.config] + [a for o in overrides for a in ("--set", o)]
            return launch(args.nproc, fwd)
        run_training(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    return 0


def _demo(args) -> int:
    import time

    import torch

    from imagebert_ds.data.toy import make_toy_data
    from imagebert_ds.train.config import load_run_config
    from imagebert_ds.train.launch import launch

    out = Path(args.out).resolve()
    data = out / "data"
    t0 = time.perf_counter()
    kw = {"train": args.train} if args.train else {}
    sizes = make_toy_data(data, test=args.test, **kw)
    print(f"toy data in {data}: {sizes} ({time.perf_counter() - t0:.1f}s)", flush=True)
    overrides = [f"run.out_dir={out / 'run'}",
                 f"stages.0.sources.0.path={data / 'stage1_web'}",
                 f"stages.1.sources.0.path={data / 'stage2_clean'}",
                 f"eval.retrieval_split={data / 'test'}", *args.overrides]
    try:
        load_run_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if (out / "run").exists():  # a demo always trains from scratch
        import shutil

        print(f"removing the previous demo run {out / 'run'}", flush=True)
        shutil.rmtree(out / "run")
    nproc = args.nproc or (torch.cuda.device_count() or 2)
    fwd = ["--config", args.config] + [a for o in overrides for a in ("--set", o)]
    t1 = time.perf_counter()
    rc = launch(nproc, fwd)
    if rc != 0:
        print(f"demo: training failed (exit code {rc})", file=sys.stderr)
        return rc
    res = json.loads((out / "run" / "retrieval.json").read_text())
    (out / "retrieval.json").write_text(json.dumps(res, indent=2))
    print(f"\nzero-shot retrieval with the ITM head on {res['num_images']} toy test images "
          f"({res['num_texts']} captions), trained in {time.perf_counter() - t1:.0f}s on "
          f"{nproc} rank(s):")
    print(f"{'direction':<15}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
    for d in ("image_to_text", "text_to_image"):
        r = res[d]
        print(f"{d:<15}{r['R@1']:>8.1f}{r['R@5']:>8.1f}{r['R@10']:>8.1f}")
    print(f"rsum {res['rsum']:.1f}   -> {out / 'retrieval.json'}")
    ok = res["text_to_image"]["R@1"] >= TARGET_T2I_R1
    print(f"target text->image R@1 >= {TARGET_T2I_R1}: {'met' if ok else 'NOT met'}")
    return 0
