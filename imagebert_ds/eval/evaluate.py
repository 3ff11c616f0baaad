"""Retrieval evaluation of a model on a test split: ``full`` and ``two-stage`` (docs/evaluation.md).

* ``full``: every (image, caption) pair through the cross-encoder's ITM match logit (ImageBERT
  §5.1's zero-shot scoring); exact, O(images x captions) forward passes.
* ``two-stage``: ITC embeddings of every image and caption, then the cross-encoder re-scores the
  ``k`` most similar candidates of each query in both directions (ALBEF's protocol); a candidate
  outside the top-k scores below every re-scored one, in its ITC order. With k >= the number of
  candidates the result equals ``full`` bit for bit.

Image rows are split over ranks and summed once at the end (N ranks give the bits of one); rows
are saved as they finish (``partial.PartialRows``), so a restarted evaluation continues.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from imagebert_ds.eval.partial import PartialRows
from imagebert_ds.eval.protocols import get_protocol, protocol_folds
from imagebert_ds.eval.retrieval import DIRECTIONS, itm_row_scores, mean_recalls, recall_at_k

MODES = ("two-stage", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EvalOptions:
    """How to run an evaluation: batching, device and ranks, precision, progress, resume."""
    batch_size: int = 512  # pairs (or single-modality inputs) per forward pass
    device: str | torch.device = "cpu"
    rank: int = 0
    world_size: int = 1
    dtype: str = "fp32"  # autocast dtype of the forward passes: fp32 / bf16 / fp16
    progress: bool = True  # tqdm bar on rank 0
    partial_dir: str | Path | None = None  # where finished rows are saved; None: not saved
    save_every_s: float = 60.0
    fresh: bool = False  # discard partial rows made with other arguments instead of failing
    fingerprint: dict = field(default_factory=dict)  # identity of checkpoint and split (resume)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        self.device = torch.device(self.device)


# ---- collectives (no-ops in a world of one) -------------------------------------------------------
def _sum_over_ranks(t: torch.Tensor, opts: EvalOptions) -> torch.Tensor:
    """Element-wise sum over ranks of a CPU tensor (each element owned by one rank: exact)."""
    if opts.world_size == 1:
        return t
    if dist.get_backend() == "nccl":
        x = t.to(opts.device)
        dist.all_reduce(x)
        return x.cpu()
    dist.all_reduce(t)
    return t


def _broadcast(obj, opts: EvalOptions):
    if opts.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=opts.device if opts.device.type == "cuda" else None)
    return box[0]


# ---- scoring ---------------------------------------------------------------------------------
def score_rows(model, split, need: torch.Tensor | None, opts: EvalOptions,
               store: PartialRows | None = None, desc: str = "pairs") -> torch.Tensor:
    """Cross-encoder scores of the pairs in ``need`` ((n_img, n_txt) bool; None = all pairs),
    as a dense (n_img, n_txt) float32 matrix, NaN where not needed; the same on every rank."""
    n_img, n_txt = split.num_images, split.num_texts
    store = store or PartialRows(None, {})
    texts_of = (lambda i: None) if need is None else (lambda i: need[i].nonzero().flatten())
    saved = store.open()  # rank 0 only
    done = {}
    for i, (texts, scores) in saved.items():  # reuse a row only if it scored the same captions
        want = texts_of(i)
        same = (texts is None and want is None) or (
            texts is not None and want is not None and torch.equal(texts.long(), want))
        if 0 <= i < n_img and same and len(scores) == (n_txt if want is None else len(want)):
            done[i] = scores
    done_rows = _broadcast(sorted(done), opts)
    done_set = set(done_rows)
    mine = [i for i in range(n_img) if i not in done_set][opts.rank::opts.world_size]
    out = torch.zeros(n_img, n_txt)
    for i, s in done.items():
        _put(out, i, texts_of(i), s)
    amp = DTYPES[opts.dtype]
    bar = None
    if opts.progress and opts.rank == 0:
        from tqdm import tqdm

        total = sum(n_txt if need is None else int(need[i].sum()) for i in mine)
        bar = tqdm(total=total, desc=desc, unit="pair", unit_scale=True, dynamic_ncols=True,
                   mininterval=1.0)
    try:
        for i in mine:
            texts = texts_of(i)
            s = itm_row_scores(model, split, i, texts, opts.batch_size, opts.device, amp)
            _put(out, i, texts, s)
            store.add(i, texts, s)
            store.maybe_save()
            if bar is not None:
                bar.update(len(s))
    finally:  # Ctrl-C / SIGTERM: keep the finished rows
        store.save()
        if bar is not None:
            bar.close()
    out = _sum_over_ranks(out, opts)
    if need is not None:
        out[~need] = float("nan")
    return out


def _put(out: torch.Tensor, i: int, texts: torch.Tensor | None, scores: torch.Tensor) -> None:
    if texts is None:
        out[i] = scores
    else:
        out[i, texts] = scores


def full_scores(model, split, batch_size: int = 512, device="cpu", rank: int = 0,
                world_size: int = 1, progress: bool = False) -> torch.Tensor:
    """(n_img, n_txt) ITM match logits of every pair (image rows over ranks; no resume)."""
    opts = EvalOptions(batch_size=batch_size, device=device, rank=rank, world_size=world_size,
                       progress=progress)
    return score_rows(model, split, None, opts)


itm_score_matrix = full_scores  # the public name (imagebert_ds.eval)


@torch.no_grad()
def itc_embeddings(model, split, opts: EvalOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm ITC embeddings (n_img, E) and (n_txt, E), float32, the same on every rank
    (fixed chunks of ``batch_size`` rows, chunk c computed on rank c % world)."""
    if "itc" not in getattr(model, "objectives", {}):
        raise ValueError(f"two-stage retrieval needs ITC embeddings, and this model has no itc "
                         f"head (objectives: {', '.join(model.objectives)}): use --mode full")
    dev, bs = opts.device, opts.batch_size
    amp = DTYPES[opts.dtype]
    dtype = next(model.parameters()).dtype
    use_amp = amp != torch.float32

    dim = model.config.objectives["itc"].embed_dim

    def run(n, fn):
        out = torch.zeros(n, dim)
        for c, s in enumerate(range(0, n, bs)):
            if c % opts.world_size == opts.rank:
                with torch.autocast(dev.type, dtype=amp, enabled=use_amp):
                    out[s:min(n, s + bs)] = fn(s, min(n, s + bs)).float().cpu()
        return _sum_over_ranks(out, opts)

    def images(s, e):
        if getattr(model.config, "pixel_input", False):
            return model.embed_image(pixel_values=split.pixel_values[s:e].to(dev, dtype))
        m = split.region_mask[s:e]
        r = int(m.any(0).nonzero().max()) + 1 if bool(m.any()) else 1
        return model.embed_image(split.region_feats[s:e, :r].to(dev, dtype),
                                 split.region_boxes[s:e, :r].to(dev, dtype), m[:, :r].to(dev))

    def texts(s, e):
        am = split.attention_mask[s:e]
        lt = int(am.sum(1).max())
        return model.embed_text(split.input_ids[s:e, :lt].to(dev), am[:, :lt].to(dev))

    return run(split.num_images, images), run(split.num_texts, texts)


#: how two-stage retrieval scores its top-k candidates: the ITM match log-odds alone (ALBEF,
#: ImageBERT's cross-encoder ranking) or ITM + the ITC cosine (BLIP / BLIP-2's re-ranking)
RERANKS = ("itm", "itm+itc")


def two_stage_scores(model, split, k: int, opts: EvalOptions, store: PartialRows | None = None,
                     desc: str = "re-rank", rerank: str = "itm") -> dict:
    """The two matrices of two-stage retrieval and what they were built from.

    Returns ``{"i2t": (n_img, n_txt), "t2i": (n_txt, n_img), "sim": ITC similarities,
    "i2t_idx": (n_img, k_i) top-k captions, "t2i_idx": (n_txt, k_t) top-k images, "pairs": the
    number of (image, caption) pairs re-scored, "itm_i2t"/"itm_t2i": the same with the ITM
    score alone (only for ``rerank="itm+itc"``)}``. The top-k candidates score ``rerank``:
    the ITM log-odds, or that plus the ITC cosine.
    """
    if rerank not in RERANKS:
        raise ValueError(f"rerank must be one of {', '.join(RERANKS)}, got '{rerank}'")
    img, txt = itc_embeddings(model, split, opts)
    sim = img @ txt.t()                                                      # (n_img, n_txt)
    n_img, n_txt = sim.shape
    i2t_idx = sim.topk(min(k, n_txt), dim=1).indices                         # (n_img, k_i)
    t2i_idx = sim.t().topk(min(k, n_img), dim=1).indices                     # (n_txt, k_t)
    need = torch.zeros(n_img, n_txt, dtype=torch.bool)
    need.scatter_(1, i2t_idx, True)
    need[t2i_idx, torch.arange(n_txt)[:, None]] = True
    ce = score_rows(model, split, need, opts, store, desc)
    out = {"sim": sim, "i2t_idx": i2t_idx, "t2i_idx": t2i_idx, "pairs": int(need.sum())}
    if rerank == "itm+itc":
        out["itm_i2t"], out["itm_t2i"] = _place_topk(ce, sim, need, i2t_idx, t2i_idx)
        ce = ce + sim
    out["i2t"], out["t2i"] = _place_topk(ce, sim, need, i2t_idx, t2i_idx)
    return out


def _place_topk(ce, sim, need, i2t_idx, t2i_idx):
    """(i2t, t2i) matrices: each direction's top-k candidates score ``ce``; the rest sit below
    every re-scored pair (cosines are in [-1, 1]), in ITC order."""
    finite = ce[need & torch.isfinite(ce)]
    floor = float(finite.min()) if len(finite) else 0.0
    low = (floor - 3.0) + sim
    i2t = low.clone().scatter_(1, i2t_idx, ce.gather(1, i2t_idx))
    t2i = low.t().clone().scatter_(1, t2i_idx, ce.t().gather(1, t2i_idx))
    return i2t, t2i


def outside_topk(split, i2t_idx: torch.Tensor, t2i_idx: torch.Tensor) -> dict:
    """Fraction of queries whose ground truth is not among their top-k candidates, per
    direction (an image counts as inside when any of its captions is)."""
    t2i = split.text_to_image
    own = t2i[i2t_idx] == torch.arange(split.num_images)[:, None]            # (n_img, k_i)
    has = torch.bincount(t2i, minlength=split.num_images) > 0
    img_out = (~own.any(1) & has).sum().item() / max(1, int(has.sum()))
    txt_out = (~(t2i_idx == t2i[:, None]).any(1)).float().mean().item()
    return {"image_to_text": img_out, "text_to_image": txt_out}


# ---- one evaluation ---------------------------------------------------------------------------
def evaluate_split(model, split, mode: str = "two-stage", k: int | None = None,
                   protocol: str = "none", opts: EvalOptions | None = None,
                   rerank: str = "itm") -> dict:
    """Evaluate ``model`` (eval mode) on ``split`` (a ``RetrievalSplit``) under ``protocol``.

    Returns the ``recall_at_k`` dict plus ``mode``, ``k`` (None for full), ``protocol``,
    ``num_images``, ``num_texts``, ``seconds``/``eval_seconds``, ``batch_size``, ``world_size``,
    ``dtype``, ``pairs_scored`` (cross-encoder passes); two-stage adds ``outside_topk`` (fractions
    per direction) and ``itc`` (the recalls of the ITC similarities alone), and with ``rerank``
    ``itm+itc`` also ``rerank`` and ``itm`` (the recalls of the ITM re-ranking alone); COCO 1K
    adds ``folds`` (each fold's result).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
    opts = opts or EvalOptions()
    proto = get_protocol(protocol)
    k = int(k or proto.default_k) if mode == "two-stage" else None
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    folds = protocol_folds(split, proto)
    model.eval()
    t0 = time.perf_counter()
    per_fold = []
    for f, sub in enumerate(folds):
        where = None
        if opts.partial_dir is not None:
            where = Path(opts.partial_dir) / f"fold{f}" if len(folds) > 1 else Path(opts.partial_dir)
        fp = {**opts.fingerprint, "mode": mode, "k": k, "protocol": protocol, "fold": f,
              "batch_size": opts.batch_size, "dtype": opts.dtype, "num_images": sub.num_images,
              "num_texts": sub.num_texts}
        store = PartialRows(where, fp, opts.rank, opts.save_every_s, opts.fresh)
        desc = mode + (f" fold {f + 1}/{len(folds)}" if len(folds) > 1 else "")
        if mode == "full":
            res = recall_at_k(score_rows(model, sub, None, opts, store, desc), sub.text_to_image)
            res["pairs_scored"] = sub.num_images * sub.num_texts
        else:
            m = two_stage_scores(model, sub, k, opts, store, desc, rerank)
            res = recall_at_k(m["i2t"], sub.text_to_image, scores_t2i=m["t2i"])
            res["outside_topk"] = outside_topk(sub, m["i2t_idx"], m["t2i_idx"])
            res["itc"] = recall_at_k(m["sim"], sub.text_to_image)
            if rerank != "itm":
                res["itm"] = recall_at_k(m["itm_i2t"], sub.text_to_image, scores_t2i=m["itm_t2i"])
            res["pairs_scored"] = m["pairs"]
        per_fold.append(res)
    if len(per_fold) == 1:
        out = per_fold[0]
    else:
        out = mean_recalls(per_fold)
        if mode == "two-stage":
            out["outside_topk"] = {d: sum(r["outside_topk"][d] for r in per_fold) / len(per_fold)
                                   for d in DIRECTIONS}
            out["itc"] = mean_recalls([r["itc"] for r in per_fold])
            if rerank != "itm":
                out["itm"] = mean_recalls([r["itm"] for r in per_fold])
        out["pairs_scored"] = sum(r["pairs_scored"] for r in per_fold)
        out["folds"] = per_fold
    seconds = time.perf_counter() - t0
    out.update(num_images=sum(s.num_images for s in folds), num_texts=sum(s.num_texts for s in folds),
               mode=mode, k=k, protocol=protocol, seconds=seconds, eval_seconds=seconds,
               rerank=rerank if mode == "two-stage" else None,
               batch_size=opts.batch_size, world_size=opts.world_size, dtype=opts.dtype)
    return out


# ---- reporting ---------------------------------------------------------------------------------
def result_label(res: dict) -> str:
    """``two-stage (k=128)`` / ``full`` (+ the protocol when there is one)."""
    label = res.get("mode", "full") + (f" (k={res['k']})" if res.get("k") else "")
    if res.get("rerank") not in (None, "itm"):
        label += f", {res['rerank']}"
    if res.get("protocol") not in (None, "none"):
        label = f"{res['protocol']}, {label}"
    return label


def markdown_table(rows: list[tuple[str, dict]]) -> str:
    """The papers' layout: Image→Text R@1/5/10 | Text→Image R@1/5/10 | RSUM, one row per result."""
    head = ("| | Image→Text R@1 | R@5 | R@10 | Text→Image R@1 | R@5 | R@10 | RSUM |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for label, r in rows:
        cells = [f"{r[d][f'R@{k}']:.1f}" for d in DIRECTIONS for k in (1, 5, 10)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['rsum']:.1f} |")
    return "\n".join(lines)


def table_rows(res: dict) -> list[tuple[str, dict]]:
    """The table rows of one result: itself, the ITC first stage, and an attached ``full`` run."""
    rows = [(result_label(res), res)]
    if "itm" in res:
        rows.append((f"ITM re-rank only (k={res['k']})", res["itm"]))
    if "itc" in res:
        rows.append(("ITC only (first stage)", res["itc"]))
    if isinstance(res.get("full"), dict):
        rows.append((result_label(res["full"]), res["full"]))
    return rows
