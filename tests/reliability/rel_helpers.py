"""Shared by the reliability tests: toy data with broken samples and shards, run commands."""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

#: what ``make_bad_source`` breaks: the i-th sample of the first shard -> (how, the reason the
#: loader gives)
BROKEN = {3: ("empty caption", "empty caption"),
          5: ("wrong feature width", ".roi.npy must have shape"),
          8: ("NaN features", "non-finite region features"),
          11: ("junk .npy", "not a valid .npy array")}


def make_bad_source(src: Path, dst: Path) -> dict[str, str]:
    """Copy ``src``'s shards to ``dst`` breaking the samples in ``BROKEN`` (in the first
    shard), and add an empty tar and a truncated copy of the first shard. Returns
    {broken key: the loader's reason}."""
    from imagebert_ds.data.shards import ShardWriter, iter_samples, list_shards, npy_bytes

    shards = list_shards(src)
    broken = {}
    for n, shard in enumerate(shards):
        with ShardWriter(dst / shard.name) as w:
            for i, (key, comps) in enumerate(iter_samples(shard)):
                how = BROKEN.get(i)[0] if n == 0 and i in BROKEN else None
                roi = np.load(io.BytesIO(comps["roi.npy"])) if "roi.npy" in comps else None
                if how == "empty caption":
                    comps["txt"] = b"  \n"
                elif how == "wrong feature width":
                    comps["roi.npy"] = npy_bytes(roi[:, :7])
                elif how == "NaN features":
                    roi = roi.copy()
                    roi[0, 1] = np.nan
                    comps["roi.npy"] = npy_bytes(roi)
                elif how == "junk .npy":
                    comps["roi.npy"] = b"<html>404</html>"
                if how:
                    broken[key] = BROKEN[i][1]
                w.write(key, comps)
    with tarfile.open(dst / "shard-empty.tar", "w"):  # a valid tar without members
        pass
    data = (dst / shards[0].name).read_bytes()
    (dst / "shard-trunc.tar").write_bytes(data[: len(data) // 2 + 100])
    return broken


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
             WANDB_SILENT="true", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    e.pop("CUDA_VISIBLE_DEVICES", None)
    e.pop("TRITON_INTERPRET", None)  # set by conftest for the kernel tests; the ranks use sdpa
    return e


def run_config(tmp: Path, source: Path, out: Path, **extra) -> Path:
    """A one-stage run config of the tiny model over ``source``: 4 samples a rank, MLM + MRFR +
    ITM (MRFR reads the region features, so a NaN there reaches the loss)."""
    cfg = {
        "run": {"name": "rel", "out_dir": str(out), "seed": 7},
        "model": {"config": "tiny", "overrides": {"num_object_classes": 24}},
        "data": {"batch_size": 4, "max_text_len": 16, "max_regions": 4, "num_threads": 1,
                 "read_batch": 8, "shuffle_buffer": 16, "prefetch_batches": 1},
        "optimizer": {"lr": 1.0e-3},
        "deepspeed": {"zero_stage": 0},
        "checkpoint": {"every_steps": 2, "keep_last": 3},
        "wandb": {"mode": "disabled"},
        "log": {"every_steps": 1, "progress": False},
        "stages": [{"name": "s1", "steps": 6, "warmup_steps": 1,
                    "sources": [{"path": str(source)}],
                    "objectives": {"mlm": 1.0, "mrfr": 1.0, "itm": 1.0}}],
    }
    for k, v in extra.items():
        node = cfg
        *head, last = k.split("__")
        for p in head:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = v
    import yaml

    path = tmp / f"run_{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "imagebert_ds", *args]


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]


def losses(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["loss/mlm"], r["loss/mrfr"], r["loss/itm"])
            for r in metrics(out) if r["stage"] == "s1"]
