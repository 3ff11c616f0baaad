"""``imagebert-ds evaluate``: retrieval R@K of a checkpoint on a test split (docs/evaluation.md).

    imagebert-ds evaluate --checkpoint runs/toy --split demo_out/data/test --mode two-stage \\
        --out eval.json [--k 128] [--protocol none] [--nproc 2] [--batch-size 512]

``--nproc N`` starts N local ranks through the deepspeed launcher (as ``pretrain --nproc``), each
running ``python -m imagebert_ds.eval`` with the same arguments; under torchrun/srun (``RANK`` /
``WORLD_SIZE`` set) the process joins that world instead. Rank 0 writes ``--out`` (JSON), prints
the markdown table and, when the checkpoint belongs to a run with W&B configured, logs the result
to W&B (``--no-wandb`` to skip). Finished score rows go to ``<out>.partial/`` as they are made: the
same command restarts a killed evaluation where it stopped; the folder is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from imagebert_ds.runtime.errors import run_command

log = logging.getLogger("imagebert_ds.eval")

#: ``protocols.PROTOCOLS``' names, here so that ``--help`` does not import torch
PROTOCOL_NAMES = ("flickr30k-1k", "coco-5k", "coco-1k", "none")


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    """The arguments of ``evaluate`` (shared by the sub-command and the per-rank entry)."""
    p.add_argument("--checkpoint", required=True,
                   help="a save_pretrained folder (e.g. <run>/<stage>/final), a run directory "
                        "(its last stage), a stage directory or one of its checkpoints")
    p.add_argument("--split", required=True, help="test split: a shard directory or one .tar")
    p.add_argument("--out", required=True, help="results JSON to write")
    p.add_argument("--mode", choices=("two-stage", "full"), default="two-stage",
                   help="two-stage: ITC top-k then ITM re-ranking (needs an itc head); full: "
                        "every pair through ITM (default: two-stage)")
    p.add_argument("--k", type=int, default=None,
                   help="two-stage candidates per query (default: 128 Flickr30k, 256 COCO, 128)")
    p.add_argument("--rerank", choices=("itm", "itm+itc"), default="itm",
                   help="two-stage: score the top-k by ITM's log-odds, or by ITM + the ITC cosine "
                        "(BLIP's re-ranking; the ITM-only recalls are reported too)")
    p.add_argument("--protocol", choices=PROTOCOL_NAMES, default="none",
                   help="flickr30k-1k, coco-5k, coco-1k (mean of five 1K folds), none (as is)")
    p.add_argument("--batch-size", type=int, default=512, help="pairs per forward pass")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast dtype (auto: bf16 on a GPU that has it, else fp32)")
    p.add_argument("--attn-impl", choices=("eager", "sdpa", "triton"), default=None,
                   help="attention backend override (e.g. sdpa for a Triton-trained model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or its folder "
                   "(default: the run's data.tokenizer, else MiniLM's)")
    p.add_argument("--max-text-len", type=int, default=None)
    p.add_argument("--max-regions", type=int, default=None)
    p.add_argument("--max-images", type=int, default=None,
                   help="only the first N images (and their captions); protocol none only")
    p.add_argument("--save-every", type=float, default=60.0,
                   help="seconds between saves of finished rows to <out>.partial/")
    p.add_argument("--fresh", action="store_true",
                   help="discard partial results made with other arguments instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-wandb", action="store_true", help="do not log to the run's W&B project")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` sub-command."""
    p = sub.add_parser("evaluate", help="retrieval R@K of a checkpoint on a test split "
                                        "(two-stage ITC + ITM re-ranking, or every pair)")
    add_evaluate_args(p)
    p.add_argument("--nproc", type=int, default=0,
                   help="start N local ranks through the deepspeed launcher (0: this process)")
    p.set_defaults(func=_evaluate, usage_errors=True)


def _forward_args(args) -> list[str]:
    """``args`` as a command line for the ranks (every evaluate argument, none of --nproc)."""
    p = argparse.ArgumentParser()
    add_evaluate_args(p)
    out: list[str] = []
    for a in p._actions:
        if not a.option_strings or a.dest == "help":
            continue
        v = getattr(args, a.dest)
        if isinstance(a, argparse._StoreTrueAction):
            out += [a.option_strings[0]] if v else []
        elif v is not None:
            out += [a.option_strings[0], str(v)]
    return out


def _evaluate(args) -> int | None:
    if args.nproc > 0 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        _check_args(args)  # fail here, not in N ranks
        from imagebert_ds.runtime.launch import launch

        return launch(args.nproc, _forward_args(args), module="imagebert_ds.eval")
    run_evaluate(args)


def rank_main(argv: list[str] | None = None) -> int:
    """One rank of ``evaluate --nproc N`` (``python -m imagebert_ds.eval``)."""
    p = argparse.ArgumentParser(prog="python -m imagebert_ds.eval")
    add_evaluate_args(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = p.parse_args(argv)
    return run_command(lambda: run_evaluate(args), "evaluate", catch_value_errors=True)


def _check_args(args) -> None:
    from imagebert_ds.eval.protocols import get_protocol
    from imagebert_ds.run.resolve import resolve_checkpoint

    resolve_checkpoint(args.checkpoint)
    if not Path(args.split).exists():
        raise FileNotFoundError(f"split {args.split} does not exist")
    get_protocol(args.protocol)
    if args.max_images is not None and args.protocol != "none":
        raise ValueError(f"--max-images cuts the split: it cannot be combined with --protocol "
                         f"{args.protocol} (use --protocol none)")
    if args.k is not None and args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")


def run_evaluate(args) -> dict:
    """The whole evaluation on this rank; returns the result (written by rank 0)."""
    from imagebert_ds.runtime.distributed import init_distributed
    from imagebert_ds.runtime.log import setup_logging

    _check_args(args)
    rank, world, device = init_distributed(deepspeed=False)
    setup_logging(rank)
    # SIGTERM (Slurm, the launcher) -> SystemExit, so finished rows are saved on the way out
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run(args, rank, world, device)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args, rank: int, world: int, device) -> dict:
    import torch

    from imagebert_ds.data import load_retrieval_split
    from imagebert_ds.eval.data import eval_data_config, split_fingerprint
    from imagebert_ds.eval.evaluate import EvalOptions, evaluate_split, markdown_table, table_rows
    from imagebert_ds.eval.partial import remove
    from imagebert_ds.eval.retrieval import first_images
    from imagebert_ds.run.resolve import load_model, resolve_checkpoint
    from imagebert_ds.runtime.distributed import shutdown

    if args.device != "auto":
        device = torch.device(args.device)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    ck = resolve_checkpoint(args.checkpoint)
    model = load_model(ck, device, args.attn_impl)
    data_cfg = eval_data_config(ck, model.config, args.tokenizer, args.max_text_len,
                                args.max_regions)
    split = load_retrieval_split(args.split, data_cfg)
    if args.max_images is not None:
        split = first_images(split, args.max_images)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    fingerprint = {**ck.fingerprint(), **split_fingerprint(args.split),
                   "max_images": args.max_images, "tokenizer": data_cfg.tokenizer,
                   "max_text_len": data_cfg.max_text_len, "max_regions": data_cfg.max_regions,
                   "attn_impl": model.config.attn_impl}
    opts = EvalOptions(batch_size=args.batch_size, device=device, rank=rank, world_size=world,
                       dtype=dtype, progress=not args.no_progress, partial_dir=partial,
                       save_every_s=args.save_every, fresh=args.fresh, fingerprint=fingerprint)
    log.info("evaluating %s on %s (%d images, %d captions): %s on %d rank(s), %s", ck.describe(),
             args.split, split.num_images, split.num_texts, args.mode, world, dtype)
    res = evaluate_split(model, split, args.mode, args.k, args.protocol, opts, args.rerank)
    res.update(checkpoint=ck.describe(), split=str(args.split))
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, out)
        remove(partial)
        print(markdown_table(table_rows(res)))
        if "outside_topk" in res:
            o = res["outside_topk"]
            print(f"ground truth outside the top-{res['k']}: image→text "
                  f"{100 * o['image_to_text']:.1f}%, text→image {100 * o['text_to_image']:.1f}%")
        print(f"{res['num_images']} images, {res['num_texts']} captions, {res['seconds']:.1f}s "
              f"-> {out}", flush=True)
        if not args.no_wandb:
            log_to_wandb(ck, res)
    shutdown()
    return res


def log_to_wandb(ck, res: dict) -> None:
    """Log the result to the checkpoint's run's W&B project (one ``eval`` run in its group), when
    the checkpoint is in a run whose ``wandb.mode`` (or ``$WANDB_MODE``) is not disabled."""
    if ck.run_cfg is None:
        return
    wcfg = ck.run_cfg.wandb
    mode = os.environ.get("WANDB_MODE", wcfg.mode)
    if mode == "disabled":
        return
    import wandb

    from imagebert_ds.runtime.log import wandb_env_defaults

    wandb_env_defaults(ck.run_dir)
    name = ck.run_cfg.run.name
    flat = {f"retrieval/{k}": v for k, v in _flatten(res).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    run = wandb.init(project=wcfg.project, entity=wcfg.entity, mode=mode, group=name,
                     name=f"{name}-eval-{res['mode']}", job_type="eval", dir=str(ck.run_dir),
                     config={k: res[k] for k in ("mode", "k", "protocol", "checkpoint", "split",
                                                 "dtype", "batch_size", "world_size")},
                     reinit="create_new")
    run.log(flat)
    run.summary.update(flat)
    run.finish()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out
