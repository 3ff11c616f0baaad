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

    f = sub.add_parser("finetune", help="retrieval fine-tuning: a run config whose model.init_from "
                                        "names a pre-trained model (configs/runs/finetune_*.yaml)")
    add_run_args(f)
    f.add_argument("--nproc", type=int, default=0, help="as for pretrain")
    f.add_argument("--init-from", default=None, metavar="DIR",
                   help="the pre-trained model (save_pretrained folder or run directory); "
                        "overrides model.init_from")
    f.set_defaults(func=_finetune)

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
    from imagebert_ds.data.shards import BadSampleError
    from imagebert_ds.train.trainer import TrainingError

    overrides = overrides_of(args)
    try:
        if args.nproc > 0:
            cfg = load_run_config(args.config, overrides)  # fail here, not in N ranks
            from imagebert_ds.train.lock import RunLock

            RunLock(cfg.run.out_dir).check()  # a live run holds out_dir: refuse before launching
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
    except BadSampleError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 1
    return 0


def _finetune(args) -> int:
    """``pretrain`` for a run that starts from a pre-trained model (``model.init_from``)."""
    from imagebert_ds.train.config import load_run_config
    from imagebert_ds.train.entry import overrides_of

    if args.init_from:
        args.overrides = [*args.overrides, f"model.init_from={Path(args.init_from).resolve()}"]
    try:
        cfg = load_run_config(args.config, overrides_of(args))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if not cfg.model.init_from:
        print(f"config error: {args.config}: fine-tuning needs model.init_from (or --init-from): "
              "the pre-trained model to start from", file=sys.stderr)
        return 2
    return _pretrain(args)


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

        from imagebert_ds.train.lock import RunLock, RunLockedError

        try:
            RunLock(out / "run").check()  # never delete a run that is still training
        except RunLockedError as e:
            print(f"demo: {e}", file=sys.stderr)
            return 1
        print(f"removing the previous demo run {out / 'run'}", flush=True)
        shutil.rmtree(out / "run")
    nproc = args.nproc or (torch.cuda.device_count() or 2)
    fwd = ["--config", args.config] + [a for o in overrides for a in ("--set", o)]
    t1 = time.perf_counter()
    rc = launch(nproc, fwd)
    if rc != 0:
        print(f"demo: training failed (exit code {rc})", file=sys.stderr)
        return rc
    from imagebert_ds.eval.evaluate import markdown_table, table_rows

    res = json.loads((out / "run" / "retrieval.json").read_text())
    (out / "retrieval.json").write_text(json.dumps(res, indent=2))
    print(f"\nzero-shot retrieval on {res['num_images']} toy test images ({res['num_texts']} "
          f"captions), trained in {time.perf_counter() - t1:.0f}s on {nproc} rank(s):")
    print(markdown_table(table_rows(res)))
    print(f"-> {out / 'retrieval.json'}")
    ok = res["text_to_image"]["R@1"] >= TARGET_T2I_R1
    print(f"target text->image R@1 >= {TARGET_T2I_R1}: {'met' if ok else 'NOT met'}")
    return 0
