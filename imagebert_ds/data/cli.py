"""Data sub-commands: make-toy-data, prepare {karpathy,pairs,regions}, validate (docs/data.md)."""
from __future__ import annotations

import argparse
import logging
import sys
import time


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _toy(args) -> int:
    from imagebert_ds.data.toy import make_toy_data

    t0 = time.perf_counter()
    sizes = make_toy_data(args.out, train=args.train, test=args.test, seed=args.seed,
                          relation_train=args.relation_train, relation_test=args.relation_test)
    print(f"toy data in {args.out}: " + ", ".join(f"{k}={v}" for k, v in sizes.items())
          + f" ({time.perf_counter() - t0:.1f}s)")
    return 0


def _karpathy(args) -> int:
    from imagebert_ds.data.convert import prepare_karpathy

    stats = prepare_karpathy(args.json, args.images, args.out, args.shard_size, args.missing)
    for split, s in stats.items():
        print(f"{split}: {dict(s)}")
    return 0


def _pairs(args) -> int:
    from imagebert_ds.data.convert import prepare_pairs

    stats = prepare_pairs(args.tsv, args.images, args.out, args.shard_size, args.missing,
                          args.skip_header, args.source)
    print(dict(stats))
    return 0


def _regions(args) -> int:
    from imagebert_ds.data.regions import merge_regions

    fields = args.fields.split(",") if args.fields else None
    print(dict(merge_regions(args.features, args.shards, fields)))
    return 0


def _validate(args) -> int:
    from imagebert_ds.data.validate import validate

    rep = validate(args.dir, args.feat_dim, args.require_images, args.require_regions,
                   args.clean_out)
    print(rep.format())
    if args.clean_out:
        print(f"clean copy written to {args.clean_out}")
    return 0 if rep.ok else 1


def _run(fn):
    def handler(args):
        _setup_logging()
        try:
            return fn(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return handler


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the data sub-commands to the top-level ``imagebert-ds`` parser."""
    p = subparsers.add_parser("make-toy-data", help="write the synthetic shapes dataset")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train", type=int, default=4000, help="stage1_web scenes (stage2: half)")
    p.add_argument("--test", type=int, default=100, help="test scenes (5 captions each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--relation-train", type=int, default=0, metavar="N",
                   help="also write relation_train/: N labelled image-text relation pairs")
    p.add_argument("--relation-test", type=int, default=0, metavar="N",
                   help="also write relation_test/: N labelled relation pairs")
    p.set_defaults(func=_run(_toy))

    prep = subparsers.add_parser("prepare", help="convert datasets to WebDataset shards")
    sub = prep.add_subparsers(dest="dataset", metavar="DATASET")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    common.add_argument("--missing", choices=["error", "skip"], default="error",
                        help="unreadable/missing image: stop (error) or leave the sample out")

    k = sub.add_parser("karpathy", parents=[common], help="Karpathy split json (Flickr30k, COCO)")
    k.add_argument("--json", required=True, help="dataset_flickr30k.json / dataset_coco.json")
    k.add_argument("--images", required=True, help="image folder (COCO: holding train2014/...)")
    k.add_argument("--out", required=True)
    k.set_defaults(func=_run(_karpathy))

    pr = sub.add_parser("pairs", parents=[common], help="TSV of image_path<TAB>caption")
    pr.add_argument("--tsv", required=True)
    pr.add_argument("--images", required=True, help="folder the TSV paths are relative to")
    pr.add_argument("--out", required=True)
    pr.add_argument("--skip-header", action="store_true")
    pr.add_argument("--source", default="pairs", help="name stored in each sample's json")
    pr.set_defaults(func=_run(_pairs))

    r = sub.add_parser("regions", help="merge region features into existing shards")
    r.add_argument("--features", required=True,
                   help="bottom-up-attention TSV file, or a folder of <image_id>.npz")
    r.add_argument("--shards", required=True, help="shard directory (searched recursively)")
    r.add_argument("--fields", default=None,
                   help="TSV column names, comma-separated (default: image_id,image_w,image_h,"
                        "num_boxes,boxes,features[,cls_prob])")
    r.set_defaults(func=_run(_regions))

    v = subparsers.add_parser("validate", help="decode and check every sample of a shard dir")
    v.add_argument("dir")
    v.add_argument("--clean-out", default=None, help="write a copy without the bad samples")
    v.add_argument("--feat-dim", type=int, default=2048)
    v.add_argument("--require-images", action="store_true")
    v.add_argument("--require-regions", action="store_true")
    v.set_defaults(func=_run(_validate))
