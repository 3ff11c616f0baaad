"""``imagebert-ds demo``: toy data -> the stages of a toy run config on local ranks -> zero-shot
retrieval (and, for a config with a probe, the linear probe beside the untrained model)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_CONFIG = "configs/runs/toy.yaml"
# the demo's text->image R@1 target per visual.mode (toy test split, chance 1)
TARGET_T2I_R1 = {"region": 80.0, "pixel": 50.0, "patch": 50.0}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command."""
    d = sub.add_parser("demo", help="toy data -> 2 pre-training stages -> zero-shot retrieval")
    d.add_argument("--out", default="demo_out", help="output directory (data, run, retrieval.json)")
    d.add_argument("--nproc", type=int, default=None,
                   help="ranks (default: number of GPUs, or 2 CPU ranks without a GPU)")
    d.add_argument("--config", default=DEMO_CONFIG)
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--train", type=int, default=None, help="toy stage-1 size (default: generator's)")
    d.add_argument("--test", type=int, default=100, help="toy test images")
    d.add_argument("--relation-train", type=int, default=2000,
                   help="labelled relation pairs to fit the probe on (configs with a probe)")
    d.add_argument("--relation-test", type=int, default=1000,
                   help="labelled relation pairs to score the probe on (configs with a probe)")
    d.set_defaults(func=_demo)


def _demo(args) -> int:
    import time

    import torch

    from imagebert_ds.data.toy import make_toy_data
    from imagebert_ds.runtime.launch import launch
    from imagebert_ds.train.config import load_run_config

    out = Path(args.out).resolve()
    data = out / "data"
    # which toy splits the config reads (each data path's last component)
    cfg = load_run_config(args.config, args.overrides, check_data=False)
    t0 = time.perf_counter()
    kw = {"train": args.train} if args.train else {}
    if cfg.probe.train:
        kw.update(relation_train=args.relation_train, relation_test=args.relation_test)
    sizes = make_toy_data(data, test=args.test, **kw)
    print(f"toy data in {data}: {sizes} ({time.perf_counter() - t0:.1f}s)", flush=True)
    overrides = [f"run.out_dir={out / 'run'}", *_toy_paths(cfg, data), *args.overrides]
    cfg = load_run_config(args.config, overrides)
    if (out / "run").exists():  # a demo always trains from scratch
        import shutil

        from imagebert_ds.runtime.lock import RunLock

        RunLock(out / "run").check()  # never delete a run that is still training
        print(f"removing the previous demo run {out / 'run'}", flush=True)
        shutil.rmtree(out / "run")
    nproc = args.nproc or (torch.cuda.device_count() or 2)
    fwd = ["--config", args.config] + [a for o in overrides for a in ("--set", o)]
    t1 = time.perf_counter()
    rc = launch(nproc, fwd)
    if rc != 0:
        print(f"demo: training failed (exit code {rc})", file=sys.stderr)
        return rc
    print(f"\ntrained in {time.perf_counter() - t1:.0f}s on {nproc} rank(s)", flush=True)
    if cfg.probe.train:
        _demo_probe(cfg, out)
    if not cfg.eval.retrieval_split:
        return 0
    from imagebert_ds.eval.evaluate import markdown_table, table_rows

    res = json.loads((out / "run" / "retrieval.json").read_text())
    (out / "retrieval.json").write_text(json.dumps(res, indent=2))
    print(f"\nzero-shot retrieval on {res['num_images']} toy test images ({res['num_texts']} "
          f"captions):")
    print(markdown_table(table_rows(res)))
    print(f"-> {out / 'retrieval.json'}")
    mode = cfg.model_config(cfg.stages[-1]).visual.mode
    target = TARGET_T2I_R1[mode]
    ok = res["text_to_image"]["R@1"] >= target
    print(f"target text->image R@1 >= {target} ({mode} input): {'met' if ok else 'NOT met'}")
    return 0


def _toy_paths(cfg, data: Path) -> list[str]:
    """Overrides pointing every data path of a toy config (``demo_out/data/<split>``) at the
    split of that name under ``data``."""
    sets = [f"stages.{i}.sources.{j}.path={data / Path(src.path).name}"
            for i, stage in enumerate(cfg.stages) for j, src in enumerate(stage.sources)]
    if cfg.eval.retrieval_split:
        sets.append(f"eval.retrieval_split={data / Path(cfg.eval.retrieval_split).name}")
    for key in ("train", "test"):
        if getattr(cfg.probe, key):
            sets.append(f"probe.{key}={data / Path(getattr(cfg.probe, key)).name}")
    return sets


def _demo_probe(cfg, out: Path) -> dict:
    """Linear probes of the trained run and of its untrained twin -> ``out/probe.json``, and the
    two side by side."""
    import torch

    from imagebert_ds.relation.cli import run_probe

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = {}
    for name, untrained in (("pretrained", False), ("untrained", True)):
        r = run_probe(str(out / "run"), cfg.probe.train, cfg.probe.test, untrained, cfg.probe.C,
                      cfg.probe.features, device=device)
        res[name] = {k: r[k] for k in ("accuracy", "f1_t", "f1_v", "f1_tv")}
        meta = r
    (out / "probe.json").write_text(json.dumps(res, indent=2))
    print(f"\nlinear probe (logistic regression, C={cfg.probe.C}) on {meta['num_train']} / "
          f"{meta['num_test']} labelled relation pairs (chance accuracy "
          f"{meta['chance_accuracy']:.1f}%), percent:")
    print("| | accuracy | F1 t | F1 v | F1 tv |\n|---|---:|---:|---:|---:|")
    for name, r in res.items():
        print(f"| {name} | {r['accuracy']:.1f} | {r['f1_t']:.1f} | {r['f1_v']:.1f} | "
              f"{r['f1_tv']:.1f} |")
    print(f"-> {out / 'probe.json'}", flush=True)
    return res
