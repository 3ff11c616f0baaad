"""Retrieval evaluation data: all images and all captions of a test split, for all-pairs ITM
scoring (``load_retrieval_split``; scored by ``imagebert_ds/eval/retrieval.py``).

Plain sequential reading (no DALI, no shuffle, no masking). Images are grouped by ``image_id``, so
both shard layouts work: one sample per image with its captions one per line in ``.txt`` (what our
converters and ``make-toy-data`` write), or one sample per image-caption pair sharing an image_id
(the image's region data is then taken from its first sample).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imagebert_ds.data.collator import Sample, pad_regions, pad_tokens
from imagebert_ds.data.config import DataConfig, load_tokenizer, padded_side
from imagebert_ds.data.dali_source import IMAGENET_MEAN, IMAGENET_STD
from imagebert_ds.data.shards.format import image_id_of, list_shards, parse_meta, split_captions
from imagebert_ds.data.shards.npy import load_npy
from imagebert_ds.data.shards.reader import iter_samples


@dataclass
class RetrievalSplit:
    """N_img images, N_txt captions; ``text_to_image[t]`` is the row of caption t's image."""

    image_ids: torch.Tensor  # (N_img,) int64
    input_ids: torch.Tensor  # (N_txt, Lt) int64, [CLS] caption [SEP], padded with [PAD]
    attention_mask: torch.Tensor  # (N_txt, Lt) int64
    text_to_image: torch.Tensor  # (N_txt,) int64 index into the image rows
    captions: list[str] = field(default_factory=list)
    region_feats: torch.Tensor | None = None  # (N_img, R, D) float32
    region_boxes: torch.Tensor | None = None  # (N_img, R, 5) float32
    region_mask: torch.Tensor | None = None  # (N_img, R) int64
    pixel_values: torch.Tensor | None = None  # (N_img, 3, S, S) float32

    @property
    def num_images(self) -> int:
        """N_img, the number of image rows."""
        return len(self.image_ids)

    @property
    def num_texts(self) -> int:
        """N_txt, the number of captions."""
        return len(self.text_to_image)

    def image_to_texts(self) -> list[list[int]]:
        """For each image row, the indices of its captions (the inverse of ``text_to_image``)."""
        out: list[list[int]] = [[] for _ in range(self.num_images)]
        for t, i in enumerate(self.text_to_image.tolist()):
            out[i].append(t)
        return out

    def pair_batch(self, image_idx: torch.Tensor, text_idx: torch.Tensor) -> dict:
        """Model inputs for pairs (image_idx[k], text_idx[k]) -- contract keys, no targets."""
        b = {"input_ids": self.input_ids[text_idx], "attention_mask": self.attention_mask[text_idx],
             "token_type_ids": torch.zeros_like(self.input_ids[text_idx])}
        if self.region_feats is not None:
            b.update(region_feats=self.region_feats[image_idx],
                     region_boxes=self.region_boxes[image_idx],
                     region_mask=self.region_mask[image_idx])
        if self.pixel_values is not None:
            b["pixel_values"] = self.pixel_values[image_idx]
        return b


def decode_image(data: bytes, size: int, key: str, fit: str = "crop") -> np.ndarray:
    """JPEG -> (3, S', S') float32, ImageNet-normalized: shorter side to ``size`` and a centre
    crop (S' = size), or with ``fit="pad"`` the longer side capped at ``padded_side(size)``, the
    aspect kept and zero padding bottom / right to that square (the loader's two rules)."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as e:
        raise ValueError(f"{key}: cannot decode image ({e})") from None
    w, h = img.size
    if fit == "pad":
        side = padded_side(size)
        scale = min(size / min(w, h), side / max(w, h))
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        arr = np.asarray(img, np.float32)
        arr = (arr - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
        out = np.zeros((3, side, side), np.float32)
        out[:, :arr.shape[0], :arr.shape[1]] = arr.transpose(2, 0, 1)
        return out
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), np.float32)
    arr = (arr - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_retrieval_split(path: str | Path, cfg: DataConfig) -> RetrievalSplit:
    """Read every sample under ``path`` (a shard directory or one .tar) in order.

    Text and regions are padded as the collator pads them (``pad_tokens``, ``pad_regions``).
    """
    tok = load_tokenizer(cfg.tokenizer, cfg.max_text_len)
    rows: dict[int, int] = {}
    image_ids, captions, t2i = [], [], []
    regions: list[Sample] = []  # one per image row: roi/box/width/height for pad_regions
    pixels = []
    for shard in list_shards(path):
        for key, comps in iter_samples(shard):
            where = f"{shard}:{key}"
            for ext in ("txt", "json"):
                if ext not in comps:
                    raise ValueError(f"{where}: missing .{ext}")
            meta = parse_meta(comps["json"], where)
            iid = image_id_of(meta, where)
            if iid not in rows:
                rows[iid] = len(image_ids)
                image_ids.append(iid)
                if cfg.use_regions:
                    for ext in ("roi.npy", "box.npy"):
                        if ext not in comps:
                            raise ValueError(f"{where}: missing .{ext}")
                    regions.append(Sample(
                        key=where, image_id=iid, token_ids=[],
                        width=float(meta.get("width") or 0), height=float(meta.get("height") or 0),
                        roi=load_npy(comps["roi.npy"], where + ".roi.npy"),
                        box=load_npy(comps["box.npy"], where + ".box.npy")))
                if cfg.use_images:
                    if "jpg" not in comps:
                        raise ValueError(f"{where}: missing .jpg")
                    pixels.append(decode_image(comps["jpg"], cfg.image_size, where, cfg.image_fit))
            for cap in split_captions(comps["txt"], where):
                captions.append(cap)
                t2i.append(rows[iid])
    if not captions:
        raise ValueError(f"{path}: no samples")
    encs = tok.encode_batch(captions)
    ids, attn = pad_tokens([e.ids for e in encs], tok.token_to_id("[PAD]"))  # (N_txt, Lt)
    split = RetrievalSplit(image_ids=torch.tensor(image_ids, dtype=torch.int64),
                           input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn),
                           text_to_image=torch.tensor(t2i, dtype=torch.int64), captions=captions)
    if cfg.use_regions:
        reg = pad_regions(regions, cfg.max_regions, cfg.region_feat_dim)
        split.region_feats = torch.from_numpy(reg.feats)
        split.region_boxes = torch.from_numpy(reg.boxes)
        split.region_mask = torch.from_numpy(reg.mask)
    if cfg.use_images:
        split.pixel_values = torch.from_numpy(np.stack(pixels))
    return split
