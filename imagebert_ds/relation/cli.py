"""``imagebert-ds probe`` and ``imagebert-ds explain``: image-text relation evaluation
(docs/evaluation.md, "Image-text relations").

    imagebert-ds probe --checkpoint RUN --train DIR --test DIR [--out FILE] [--untrained]
    imagebert-ds explain --checkpoint RUN --sample DIR:KEY --out map.png
    imagebert-ds explain --checkpoint RUN --image img.jpg --regions roi.npy box.npy \\
        --caption "a red circle" --out map.png

``--checkpoint`` takes what ``evaluate`` takes (``run/resolve.py``); the run's resolved config
supplies the tokenizer, text length and regions. Both run in this process, on the CPU or one GPU.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``probe`` and ``explain`` sub-commands."""
    p = sub.add_parser("probe", help="linear probe (logistic regression) of the frozen encoder on "
                                     "labelled image-text relation splits")
    p.add_argument("--checkpoint", required=True, help="run / stage / model folder / checkpoint")
    p.add_argument("--train", required=True, help="labelled split the probe is fitted on")
    p.add_argument("--test", required=True, help="labelled split the probe is scored on")
    p.add_argument("--out", default=None, help="write the result here (JSON)")
    p.add_argument("--C", type=float, default=None, help="inverse regularisation (default 0.25)")
    p.add_argument("--features", choices=["joint", "joint+modalities"], default="joint",
                   help="fused [CLS] only, or also the text-only and image-only [CLS]")
    p.add_argument("--untrained", action="store_true",
                   help="probe the same architecture at its random initialisation instead")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.set_defaults(func=_probe, usage_errors=True)

    e = sub.add_parser("explain", help="Grad-CAM relevance of each region / image cell for the "
                                       "ITM score of one pair, drawn over the image (PNG)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--image", default=None, help="image file (JPEG/PNG)")
    e.add_argument("--caption", default=None, help="the text (default with --sample: its caption)")
    e.add_argument("--regions", nargs=2, default=None, metavar=("ROI.npy", "BOX.npy"),
                   help="region model: features (R, D) and pixel boxes (R, 4) of --image")
    e.add_argument("--sample", default=None, metavar="SHARDS:KEY",
                   help="a sample of a shard directory or .tar instead of --image/--regions")
    e.add_argument("--out", required=True, help="PNG to write (one pair: runs on the CPU)")
    e.set_defaults(func=_explain, usage_errors=True)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_relation(checkpoint: str, untrained: bool = False, device="cpu"):
    """(model in eval mode on ``device``, the DataConfig that reads splits for it)."""
    from imagebert_ds.eval.data import eval_data_config
    from imagebert_ds.run.resolve import load_model, resolve_checkpoint
    from imagebert_ds.relation.probe import untrained_model

    ck = resolve_checkpoint(checkpoint)
    model = untrained_model(ck).to(device).eval() if untrained else load_model(ck, device)
    return model, eval_data_config(ck, model.config)  # images for pixel / patch models


def run_probe(checkpoint: str, train: str, test: str, untrained: bool = False,
              C: float | None = None, features: str = "joint", batch_size: int = 256,
              device="cpu") -> dict:
    """The linear probe of a checkpoint (or its untrained twin) -> result dict."""
    from imagebert_ds.relation.probe import PROBE_C, linear_probe

    model, data_cfg = load_for_relation(checkpoint, untrained, device)
    res = linear_probe(model, train, test, data_cfg, PROBE_C if C is None else C, batch_size,
                       device, modalities=features == "joint+modalities")
    res.update(checkpoint=str(checkpoint), untrained=untrained, train=str(train), test=str(test))
    return res


def _probe(args) -> int:
    res = run_probe(args.checkpoint, args.train, args.test, args.untrained, args.C,
                    args.features, args.batch_size, _device(args.device))
    print(f"linear probe ({'untrained' if args.untrained else 'pre-trained'}, "
          f"{res['num_train']} train / {res['num_test']} test pairs, chance "
          f"{res['chance_accuracy']:.1f}%): accuracy {res['accuracy']:.1f}  F1 t "
          f"{res['f1_t']:.1f}  v {res['f1_v']:.1f}  tv {res['f1_tv']:.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(f"-> {args.out}")
    return 0


def _explain(args) -> int:
    from imagebert_ds.relation.explain import explain, read_inputs

    inp = read_inputs(args.image, args.caption, args.regions, args.sample)
    model, data_cfg = load_for_relation(args.checkpoint, device="cpu")
    res = explain(model, inp, data_cfg, args.out)
    print(f"\"{res['caption']}\": ITM log-odds {res['itm_logodds']:+.3f}; relevance per image "
          f"token {res['relevance']} -> {res['png']}")
    return 0
