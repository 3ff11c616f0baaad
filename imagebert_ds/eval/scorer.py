"""``Scorer``: score image-caption pairs and embed images and captions with a trained checkpoint.

    from imagebert_ds import Scorer

    scorer = Scorer.from_pretrained("runs/toy/stage2_clean/final", device="cpu")
    image = {"region_feats": feats, "region_boxes": boxes}      # (R, 2048), (R, 5) or (R, 4) + size
    p = scorer.score([image, image], ["a red circle on the left", "a blue square"])   # (2,) P(match)
    m = scorer.score_matrix("data/test", split.captions)        # (n_img, n_txt), every pair
    e_img, e_txt = scorer.embed_images("data/test"), scorer.embed_texts(["a red circle"])  # ITC

Images are region features, in any of these forms:

* a dict ``{"region_feats": (R, D), "region_boxes": (R, 5), "region_mask": (R,) optional}`` (torch
  or numpy) for one image, or the same with a leading image dimension for N images. Boxes are the
  model's 5-d locations ``(x1/W, y1/H, x2/W, y2/H, area)``; 4-d pixel boxes (the shards' ``.box.npy``)
  are accepted with ``"width"`` and ``"height"`` in the dict;
* a list of such single-image dicts (any number of regions each; padded like the collator pads);
* a shard directory (or a ``RetrievalSplit``): every image in it, in order (``load_split``).

A pixel model (Pixel-BERT, ``visual.mode: pixel | patch``) takes pixels instead: an image file
path, its bytes (JPEG / PNG) or a PIL image — decoded, resized and normalized by the loader's rule
for the run's ``data.image_size`` / ``image_fit`` — or an already normalized (3, S, S) / (N, 3, S, S)
array; a list of any of these; or a shard directory / ``RetrievalSplit`` as above.

Captions are strings, tokenized with the checkpoint's tokenizer (the run's ``data.tokenizer``, else
MiniLM's uncased vocab) and truncated to its ``max_text_len``. Work is batched (``batch_size``
pairs or inputs per forward pass) on the scorer's device; results come back on the CPU in float32.
Scores are ITM match probabilities, ``sigmoid`` of the match log-odds that retrieval ranks by
(``as_prob=False`` returns the log-odds). Different batching can change the last bits of a score.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from imagebert_ds.eval.evaluate import DTYPES


class Scorer:
    """A model in eval mode plus the tokenizer and region settings it was trained with."""

    def __init__(self, model, tokenizer, data_config, device: str | torch.device = "cpu",
                 batch_size: int = 256, dtype: str = "fp32", name: str = "<model>"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.data_config = data_config
        self.batch_size = batch_size
        self.dtype = dtype
        self.name = name
        self._pad_id = tokenizer.token_to_id("[PAD]")
        self.pixel_input = bool(getattr(model.config, "pixel_input", False))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        batch_size: int = 256, dtype: str = "fp32", tokenizer: str | None = None,
                        max_text_len: int | None = None, max_regions: int | None = None,
                        attn_impl: str | None = None) -> "Scorer":
        """Load what ``imagebert-ds evaluate --checkpoint`` accepts (a ``save_pretrained`` folder,
        a run or one of its checkpoints); ``device`` defaults to CUDA when present."""
        from imagebert_ds.data import load_tokenizer
        from imagebert_ds.eval.data import eval_data_config
        from imagebert_ds.run.resolve import load_model, resolve_checkpoint

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        ck = resolve_checkpoint(path)
        model = load_model(ck, device, attn_impl)
        cfg = eval_data_config(ck, model.config, tokenizer, max_text_len, max_regions)
        return cls(model, load_tokenizer(cfg.tokenizer, cfg.max_text_len), cfg, device,
                   batch_size, dtype, name=ck.describe())

    # ---- inputs ------------------------------------------------------------------------------
    def load_split(self, path: str | os.PathLike):
        """A shard directory as a ``RetrievalSplit`` read with this checkpoint's settings."""
        from imagebert_ds.data import load_retrieval_split

        return load_retrieval_split(path, self.data_config)

    def tokenize(self, captions: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ``(input_ids, attention_mask)``, (N, L) int64, padded to the longest."""
        from imagebert_ds.data.collator import pad_tokens

        if isinstance(captions, str):
            captions = [captions]
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions must be a non-empty list of strings")
        ids, attn = pad_tokens([e.ids for e in self.tokenizer.encode_batch(list(captions))],
                               self._pad_id)
        return torch.from_numpy(ids), torch.from_numpy(attn)

    def regions(self, images: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Any accepted image form -> ``(feats (N, R, D), boxes (N, R, 5), mask (N, R))``."""
        from imagebert_ds.data.retrieval_split import RetrievalSplit

        if isinstance(images, (str, Path)):
            images = self.load_split(images)
        if isinstance(images, RetrievalSplit):
            if images.region_feats is None:
                raise ValueError("the split has no region features (read with use_regions)")
            return images.region_feats, images.region_boxes, images.region_mask
        if isinstance(images, dict):
            feats = torch.as_tensor(np.asarray(images["region_feats"], np.float32))
            if feats.ndim == 2:
                return self._stack([images])
            if feats.ndim != 3:
                raise ValueError(f"region_feats must be (R, D) or (N, R, D), got {tuple(feats.shape)}")
            return self._stack([{k: (v[i] if _is_batched(v, feats.shape[0]) else v)
                                 for k, v in images.items()} for i in range(feats.shape[0])])
        if isinstance(images, (list, tuple)) and images and all(isinstance(x, dict) for x in images):
            return self._stack(list(images))
        raise TypeError("images must be a dict of region arrays, a list of such dicts, a shard "
                        f"directory or a RetrievalSplit, got {type(images).__name__}")

    def pixels(self, images: Any) -> torch.Tensor:
        """Any accepted pixel-model image form -> (N, 3, S, S) normalized float32 pixels."""
        from imagebert_ds.data.retrieval_split import RetrievalSplit

        if isinstance(images, (str, Path)) and Path(images).is_dir():
            images = self.load_split(images)
        if isinstance(images, RetrievalSplit):
            if images.pixel_values is None:
                raise ValueError("the split has no pixels (read with use_images)")
            return images.pixel_values
        if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim in (3, 4):
            t = torch.as_tensor(np.asarray(images, np.float32))
            t = t[None] if t.ndim == 3 else t
            if t.shape[1] != 3:
                raise ValueError(f"pixel arrays must be (3, S, S) or (N, 3, S, S) normalized "
                                 f"images, got {tuple(images.shape)}")
            return t
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("images is empty")
        out = [self._decode(x, f"images[{i}]") for i, x in enumerate(items)]
        shapes = {tuple(o.shape) for o in out}
        if len(shapes) > 1:
            raise ValueError(f"images decode to different shapes {sorted(shapes)}: pass them "
                             "separately")
        return torch.stack(out)

    def _decode(self, x: Any, where: str) -> torch.Tensor:
        from imagebert_ds.data.retrieval_split import decode_image

        cfg = self.data_config
        if isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim == 3 and x.shape[0] == 3:
            return torch.as_tensor(np.asarray(x, np.float32))
        if isinstance(x, (str, Path)):
            if not Path(x).is_file():
                raise FileNotFoundError(f"{where}: image file {x} does not exist")
            where, x = str(x), Path(x).read_bytes()
        elif hasattr(x, "save") and hasattr(x, "mode"):  # a PIL image
            import io

            buf = io.BytesIO()
            x.convert("RGB").save(buf, format="PNG")
            x = buf.getvalue()
        if not isinstance(x, (bytes, bytearray)):
            raise TypeError(f"{where}: a pixel model takes image files, bytes, PIL images or "
                            f"(3, S, S) arrays, got {type(x).__name__}")
        return torch.from_numpy(decode_image(bytes(x), cfg.image_size, where, cfg.image_fit))

    def _image_inputs(self, images: Any) -> dict[str, torch.Tensor]:
        """The model's image-side keyword inputs for N images, in the model's input form."""
        if self.pixel_input:
            return {"pixel_values": self.pixels(images)}
        feats, boxes, mask = self.regions(images)
        return {"region_feats": feats, "region_boxes": boxes, "region_mask": mask}

    def _to_device(self, img: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Image inputs of one forward pass on the device (regions cut to the longest real)."""
        dev, dtype = self.device, next(self.model.parameters()).dtype
        if "pixel_values" in img:
            return {"pixel_values": img["pixel_values"].to(dev, dtype)}
        mask = img["region_mask"]
        r = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
        return {"region_feats": img["region_feats"][:, :r].to(dev, dtype),
                "region_boxes": img["region_boxes"][:, :r].to(dev, dtype),
                "region_mask": mask[:, :r].to(dev)}

    def _stack(self, items: list[dict]):
        from imagebert_ds.data.collator import box_features

        R = self.data_config.max_regions
        D = self.model.config.region_feat_dim
        rows = []
        for n, it in enumerate(items):
            where = f"images[{n}]"
            for key in ("region_feats", "region_boxes"):
                if key not in it:
                    raise ValueError(f"{where}: missing '{key}'")
            f = np.asarray(it["region_feats"], np.float32)
            b = np.asarray(it["region_boxes"], np.float32)
            if f.ndim != 2 or f.shape[1] != D:
                raise ValueError(f"{where}: region_feats must be (R, {D}), got {f.shape}")
            if b.shape[:-1] != f.shape[:1] or b.shape[-1] not in (4, 5):
                raise ValueError(f"{where}: region_boxes must be ({len(f)}, 5) (or 4 with width "
                                 f"and height), got {b.shape}")
            if b.shape[-1] == 4:
                if "width" not in it or "height" not in it:
                    raise ValueError(f"{where}: 4-d pixel boxes need 'width' and 'height'")
                b = box_features(b, float(it["width"]), float(it["height"]), where)
            m = np.asarray(it.get("region_mask", np.ones(len(f))), np.int64)
            rows.append((f[:R], b[:R], m[:R]))
        r = max(1, max(len(f) for f, _, _ in rows))
        feats = torch.zeros(len(rows), r, D)
        boxes = torch.zeros(len(rows), r, 5)
        mask = torch.zeros(len(rows), r, dtype=torch.long)
        for i, (f, b, m) in enumerate(rows):
            feats[i, :len(f)] = torch.from_numpy(f)
            boxes[i, :len(f)] = torch.from_numpy(b)
            mask[i, :len(f)] = torch.from_numpy(m)
        return feats, boxes, mask

    # ---- scores ------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, images: Any, captions: str | Sequence[str], as_prob: bool = True) -> torch.Tensor:
        """Match probability of each pair ``(images[i], captions[i])``: (N,) for N images and N
        captions (pairwise, not all pairs: ``score_matrix`` does that); one image against N
        captions, or N images against one caption, broadcasts."""
        img = self._image_inputs(images)
        ids, attn = self.tokenize(captions)
        n_i, n_t = len(next(iter(img.values()))), len(ids)
        if n_i != n_t and 1 not in (n_i, n_t):
            raise ValueError(f"score() pairs images[i] with captions[i], got {n_i} images and "
                             f"{n_t} captions: use score_matrix() for every pair")
        n = max(n_i, n_t)
        img_idx = torch.arange(n) if n_i == n else torch.zeros(n, dtype=torch.long)
        txt_idx = torch.arange(n) if n_t == n else torch.zeros(n, dtype=torch.long)
        out = torch.empty(n)
        for s in range(0, n, self.batch_size):
            ii, tt = img_idx[s:s + self.batch_size], txt_idx[s:s + self.batch_size]
            out[s:s + len(ii)] = self._itm({k: v[ii] for k, v in img.items()}, ids[tt], attn[tt])
        return torch.sigmoid(out) if as_prob else out

    @torch.no_grad()
    def score_matrix(self, images: Any, captions: str | Sequence[str],
                     as_prob: bool = True) -> torch.Tensor:
        """(n_img, n_txt) match probabilities of every pair, each image broadcast over chunks of
        captions (the evaluator's ``full`` mode scoring)."""
        from imagebert_ds.data.retrieval_split import RetrievalSplit
        from imagebert_ds.eval.retrieval import itm_row_scores

        img = self._image_inputs(images)
        ids, attn = self.tokenize(captions)
        n = len(next(iter(img.values())))
        split = RetrievalSplit(image_ids=torch.arange(n), input_ids=ids, attention_mask=attn,
                               text_to_image=torch.zeros(len(ids), dtype=torch.long), **img)
        out = torch.stack([itm_row_scores(self.model, split, i, None, self.batch_size, self.device,
                                          DTYPES[self.dtype]) for i in range(n)])
        return torch.sigmoid(out) if as_prob else out

    def _itm(self, img: dict, ids, attn) -> torch.Tensor:
        lt = int(attn.sum(1).max())
        with self._autocast():
            logit = self.model.itm_scores(
                input_ids=ids[:, :lt].to(self.device), attention_mask=attn[:, :lt].to(self.device),
                as_prob=False, **self._to_device(img))
        return logit.float().cpu()

    # ---- embeddings --------------------------------------------------------------------------
    @torch.no_grad()
    def embed_images(self, images: Any) -> torch.Tensor:
        """(N, E) unit-norm ITC embeddings of the images (needs an itc head)."""
        self._need_itc()
        img = self._image_inputs(images)
        out = []
        for s in range(0, len(next(iter(img.values()))), self.batch_size):
            chunk = {k: v[s:s + self.batch_size] for k, v in img.items()}
            with self._autocast():
                e = self.model.embed_image(**self._to_device(chunk))
            out.append(e.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, captions: str | Sequence[str]) -> torch.Tensor:
        """(N, E) unit-norm ITC embeddings of the captions (needs an itc head)."""
        self._need_itc()
        ids, attn = self.tokenize(captions)
        out = []
        for s in range(0, len(ids), self.batch_size):
            a = attn[s:s + self.batch_size]
            lt = int(a.sum(1).max())
            with self._autocast():
                e = self.model.embed_text(ids[s:s + self.batch_size, :lt].to(self.device),
                                          a[:, :lt].to(self.device))
            out.append(e.float().cpu())
        return torch.cat(out)

    def _need_itc(self) -> None:
        if "itc" not in self.model.objectives:
            raise ValueError(f"{self.name} has no itc head (objectives: "
                             f"{', '.join(self.model.objectives)}): ITC embeddings need a model "
                             f"trained with the itc objective")

    def _autocast(self):
        amp = DTYPES[self.dtype]
        return torch.autocast(self.device.type, dtype=amp, enabled=amp != torch.float32)


def _is_batched(v, n: int) -> bool:
    """Whether a dict value carries one entry per image (so it is split per image)."""
    if isinstance(v, (int, float)):
        return False
    return getattr(v, "ndim", np.ndim(v)) >= 1 and len(v) == n
