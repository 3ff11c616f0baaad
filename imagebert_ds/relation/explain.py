"""Activation maps: Grad-CAM-style relevance of each image token for the ITM match score.

The picture the image-text relation framework uses to show correspondence (Sun et al.): for one
(image, caption) pair the ITM head's match log-odds ``s = logit[1] - logit[0]`` is
back-propagated to the input of the encoder's last layer — the deepest hidden states the
output [CLS] still reads (the last layer's own outputs at image positions never reach it) — and
each image token gets Grad-CAM's ``relu(<x_r, ∂s/∂x_r>)`` (gradient × activation summed over the
hidden dimension, Selvaraju et al. 2017, at token rather than channel granularity). Region models
colour each detector box by its region's relevance; pixel / patch models show the relevance of
each feature-map cell as a heat map over the image.

Inputs: an image file with ``--regions ROI.npy BOX.npy`` (pixel boxes), or ``--sample
SHARD_OR_DIR:KEY`` for a sample of our shards (its .jpg, .roi.npy, .box.npy, .json, and its first
caption unless ``--caption`` is given).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch


@dataclass
class ExplainInput:
    """One pair: the JPEG/PNG bytes, its caption, and (region models) raw pixel boxes (R, 4)
    with their features (R, D), plus the image's width and height."""
    image: bytes
    caption: str
    width: float
    height: float
    roi: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None
    key: str = "<input>"


def read_sample(spec: str) -> ExplainInput:
    """``PATH:KEY`` (PATH a shard directory or a .tar) -> the sample's components."""
    from imagebert_ds.data.shards import iter_samples, list_shards, load_npy, parse_meta, \
        split_captions

    path, sep, key = spec.rpartition(":")
    if not sep or not path:
        raise ValueError(f"--sample {spec!r}: expected SHARD_DIR_OR_TAR:KEY")
    for shard in list_shards(path):
        for k, comps in iter_samples(shard):
            if k != key:
                continue
            where = f"{shard}:{k}"
            if "jpg" not in comps:
                raise ValueError(f"{where}: no .jpg to draw")
            meta = parse_meta(comps.get("json", b"{}"), where)
            roi = load_npy(comps["roi.npy"], where + ".roi.npy") if "roi.npy" in comps else None
            box = load_npy(comps["box.npy"], where + ".box.npy") if "box.npy" in comps else None
            return ExplainInput(image=comps["jpg"], caption=split_captions(comps["txt"], where)[0],
                                width=float(meta.get("width") or 0),
                                height=float(meta.get("height") or 0), roi=roi, box=box, key=where)
    raise ValueError(f"--sample {spec!r}: no sample with key {key!r} under {path}")


def read_inputs(image: Optional[str], caption: Optional[str], regions: Optional[list[str]],
                sample: Optional[str]) -> ExplainInput:
    """The CLI's inputs: ``--sample`` or ``--image`` (+ ``--regions``); ``--caption`` wins."""
    from PIL import Image

    if sample:
        inp = read_sample(sample)
    elif image:
        data = Path(image).read_bytes()
        w, h = Image.open(io.BytesIO(data)).size
        roi = box = None
        if regions:
            if len(regions) != 2:
                raise ValueError("--regions takes two files: ROI.npy (R, D) and BOX.npy (R, 4)")
            roi, box = (np.load(p, allow_pickle=False) for p in regions)
        inp = ExplainInput(image=data, caption=caption or "", width=w, height=h, roi=roi,
                           box=box, key=image)
    else:
        raise ValueError("give --image IMG (with --regions for a region model) or --sample PATH:KEY")
    if caption:
        inp.caption = caption
    if not inp.caption:
        raise ValueError(f"{inp.key}: no caption: pass --caption")
    return inp


def model_inputs(model, inp: ExplainInput, data_cfg) -> dict:
    """Contract keys of the one pair (batch of 1) for ``model``'s ``visual.mode``."""
    from imagebert_ds.data.collator import Sample, pad_regions
    from imagebert_ds.data.config import load_tokenizer
    from imagebert_ds.data.retrieval_split import decode_image

    tok = load_tokenizer(data_cfg.tokenizer, data_cfg.max_text_len)
    ids = torch.tensor([tok.encode(inp.caption).ids])
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.pixel_input:
        px = decode_image(inp.image, data_cfg.image_size, inp.key, data_cfg.image_fit)
        b["pixel_values"] = torch.from_numpy(px)[None]
        return b
    if inp.roi is None or inp.box is None:
        raise ValueError(f"{inp.key}: a region model needs the regions (--regions ROI.npy BOX.npy)")
    s = Sample(key=inp.key, image_id=0, token_ids=[], width=inp.width, height=inp.height,
               roi=inp.roi, box=inp.box)
    reg = pad_regions([s], min(len(inp.roi), model.config.max_regions), model.config.region_feat_dim)
    b.update(region_feats=torch.from_numpy(reg.feats), region_boxes=torch.from_numpy(reg.boxes),
             region_mask=torch.from_numpy(reg.mask))
    return b


def relevance(model, batch: dict) -> tuple[np.ndarray, float]:
    """(image tokens,) Grad-CAM relevance (max-normalised to [0, 1]) and the match log-odds."""
    if "itm" not in model.objectives:
        raise ValueError("explain scores the pair with the ITM head: the model has no itm objective")
    layer = model.bert.encoder.layer[-1]
    seen: dict = {}

    def grab(_module, args):
        args[0].retain_grad()
        seen["x"] = args[0]

    handle = layer.register_forward_pre_hook(grab)
    try:
        model.eval()
        with torch.enable_grad():
            s = model.itm_scores(as_prob=False, **batch)[0]
            s.backward()
    finally:
        handle.remove()
    x = seen["x"]
    Lt = batch["input_ids"].shape[1]
    cam = (x.grad[0, Lt:] * x[0, Lt:]).sum(-1).relu().detach()             # (V,)
    if batch.get("region_mask") is not None:
        cam = cam * batch["region_mask"][0]
    cam = cam / cam.max().clamp(min=1e-12)
    return cam.numpy(), float(s.detach())


def draw(inp: ExplainInput, cam: np.ndarray, score: float, out: str | Path,
         boxes: Optional[np.ndarray] = None) -> Path:
    """The image with each box filled by its relevance (regions), or the relevance grid as a
    heat map over the image (pixels / patches); caption and score in the title -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(inp.image)).convert("RGB"))
    fig, ax = plt.subplots(figsize=(5, 5.6))
    ax.imshow(img)
    cmap = plt.get_cmap("jet")
    if boxes is not None:
        for r in np.argsort(cam):  # most relevant drawn last, on top
            x1, y1, x2, y2 = boxes[r]
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor=cmap(cam[r]),
                                   alpha=0.25 + 0.35 * cam[r], edgecolor=cmap(cam[r]), lw=2))
            ax.text(x1, y1, f"{cam[r]:.2f}", color="white", fontsize=8,
                    bbox={"facecolor": "black", "alpha": 0.6, "pad": 1})
    else:
        side = int(round(len(cam) ** 0.5))
        if side * side != len(cam):
            raise ValueError(f"{len(cam)} visual tokens do not form a square grid")
        ax.imshow(cam.reshape(side, side), cmap=cmap, alpha=0.5, interpolation="bilinear",
                  extent=(0, img.shape[1], img.shape[0], 0), vmin=0, vmax=1)
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=ax, fraction=0.046, pad=0.04,
                 label="Grad-CAM relevance for ITM")
    ax.set_title(f"\"{inp.caption}\"\nITM log-odds {score:+.2f}", fontsize=9, wrap=True)
    ax.axis("off")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def explain(model, inp: ExplainInput, data_cfg, out: str | Path) -> dict:
    """Relevance of each image token for the pair's ITM score, drawn into ``out`` (PNG)."""
    batch = model_inputs(model, inp, data_cfg)
    cam, score = relevance(model, batch)
    boxes = None if model.config.pixel_input else inp.box[:len(cam)]
    path = draw(inp, cam, score, out, boxes)
    return {"png": str(path), "itm_logodds": score, "relevance": [round(float(c), 4) for c in cam],
            "caption": inp.caption}
