"""Benchmark: the pre-training step — per attention backend, the trainer's own step, and the
HF-style baseline.

    python benchmarks/bench_train.py            # GPU: BERT-base, bf16; CPU: labelled smoke run
    python benchmarks/bench_train.py --zero-stage 3 --trainer-steps 80

Rows, all at one batch shape (``--batch`` samples of 10-40-token captions + ``--regions`` detector
regions, 100 in the paper; ImageBERT's four objectives MLM + MOC + MRFR + ITM unless
``--objectives all`` adds ITC, which the baseline does not have):

  eager / sdpa / triton  our model (``ImageBERTForPretraining``), one forward + backward + AdamW
                         step on one fixed batch, plain ``torch.autocast``; ``triton`` = the
                         unpadded varlen encoder with fused add+LayerNorm and MLM loss (GPU only)
  trainer                the REAL trainer: ``python -m imagebert_ds.train`` on a generated run
                         config (``configs/runs/toy.yaml``'s structure) — DeepSpeed engine with the
                         run's ZeRO stage (``--zero-stage``) and precision, the real loader reading
                         synthetic shards of the same shape (``synthetic_shards.py``), every step
                         logged; step time, samples/s, real tokens/s, TFLOP/s, MFU and the
                         data-wait fraction are read back from its ``metrics.jsonl`` (medians over
                         the steps after ``--trainer-warmup`` warm-up steps; the data-wait
                         fraction is time-weighted over the same steps)
  hf_eager_baseline      what a user would write with transformers: ``BertModel`` with
                         ``attn_implementation="eager"`` fed ``inputs_embeds`` = word embeddings ++
                         projected region features (padded, L x L scores materialized), HF's
                         ``BertPreTrainingHeads`` (MLM logits over every text position + ITM) plus
                         linear MOC / MRFR heads, plain ``torch.autocast`` and
                         ``torch.optim.AdamW``, no DeepSpeed; on the SAME batch as the backend rows

  pixel_{S}              Pixel-BERT (``--pixel-model``: ResNet-50 + BERT-base on a GPU, the tiny
                         ResNet-18 trunk on the CPU) on ``--pixel-batch`` images padded to the
                         paper's ``image_fit: pad`` square for shorter side S (``--pixel-sizes``:
                         384 and 800 on a GPU, 32 in the smoke run), MLM + ITM, random pixel
                         sampling as configured; one forward + backward + AdamW step under AMP
                         (the triton backend on a GPU). Its own batch, so ``speedup_vs_hf`` does
                         not apply; its TFLOP/s count the Transformer only, not the CNN

Reported: median step time (GPU: ``common.bench_ms`` per row; CPU: the rows' steps interleaved,
``time_steps``), samples/s, real (unpadded) tokens/s, model
TFLOP/s with the trainer's FLOP formula (``imagebert_ds.model.flops``, the same count for every row
of a batch), MFU on a known GPU, peak memory, ``speedup_vs_eager`` and ``speedup_vs_hf`` (samples/s
over the baseline's). On the CPU: the tiny model at smoke size in fp32 — the ratios are the point,
not the times.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets TRITON_INTERPRET on a CPU-only machine before triton loads)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

import synthetic_shards as synth  # noqa: E402
from imagebert_ds.kernels import triton_available  # noqa: E402
from imagebert_ds.model import (DEFAULT_OBJECTIVES, OBJECTIVES, PretrainingConfig,  # noqa: E402
                                ImageBERTForPretraining)
from imagebert_ds.testing import contract_batch  # noqa: E402
from imagebert_ds.train.metrics import device_peak_tflops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMOKE_REPS = 9  # CPU: median of 9 interleaved steps after one warm-up step (GPU: do_bench)


def step_row(name: str, ms: float, batch: dict, flops: float, peak_mem, image_tokens=None) -> dict:
    """Step time -> samples/s, real tokens/s, TFLOP/s and MFU of one row (``image_tokens``:
    the visual tokens of a pixel batch, else its real regions)."""
    image = batch["region_mask"].sum() if image_tokens is None else image_tokens
    real = float(batch["attention_mask"].sum() + image)
    tflops = flops / (ms * 1e-3) / 1e12
    peak = device_peak_tflops()
    return {"backend": name, "step_ms": ms,
            "samples_per_s": batch["input_ids"].shape[0] / (ms * 1e-3),
            "tokens_per_s": real / (ms * 1e-3), "tflops": tflops,
            "mfu": tflops / peak if peak else None, "peak_mem_mb": peak_mem}


def amp_step(model, opt, loss_fn, device, dtype):
    """One forward + backward + optimizer step under plain torch AMP (a GradScaler for fp16)."""
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
    return step


# --- our model, per attention backend ------------------------------------------------------------
def build_backend(name: str, cfg_dict: dict, batch: dict, dtype, device):
    """One backend's training step and the batch's model FLOPs (the trainer's formula)."""
    impl, fused = {"eager": ("eager", False), "sdpa": ("sdpa", False),
                   "triton": ("triton", True)}[name]
    cfg = PretrainingConfig.from_dict({**cfg_dict, "attn_impl": impl, "fused_ops": fused})
    torch.manual_seed(0)
    model = ImageBERTForPretraining(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    return amp_step(model, opt, lambda: model(**batch)["loss"], device, dtype), \
        float(model.training_flops(batch))


def time_steps(steps: dict) -> dict[str, float]:
    """Median ms per step of each of ``steps`` (name -> step). GPU: ``common.bench_ms`` one after
    the other. CPU: one warm-up step each, then ``SMOKE_REPS`` rounds in rotating order, so load
    from the rest of the machine (a shared 2-core box) hits every row alike."""
    if common.HAS_CUDA:
        return {n: common.bench_ms(f) for n, f in steps.items()}
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for f in steps.values():
        f()
    for i in range(SMOKE_REPS):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            steps[n]()
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def pixel_batch(cfg: PretrainingConfig, batch: int, size: int, device) -> dict:
    """A Pixel-BERT batch: 10-40-token captions + images padded to ``image_fit: pad``'s square
    for shorter side ``size`` (the loader's rule; the content is noise)."""
    from imagebert_ds.data.config import padded_side

    g = torch.Generator().manual_seed(0)
    b = contract_batch(cfg, batch, text_len=(10, 40), regions=1, generator=g, mlm_prob=0.15,
                       with_probs=False)
    b = {k: v for k, v in b.items() if not k.startswith(("region", "moc"))}
    side = padded_side(size)
    b["pixel_values"] = torch.randn(batch, 3, side, side, generator=g)
    return {k: v.to(device) for k, v in b.items()}


def build_pixel_rows(args, device, dtype, backend: str) -> list[dict]:
    """One timed row per ``--pixel-sizes`` entry (see the module docstring)."""
    from imagebert_ds.model.flops import image_lengths

    rows = []
    impl, fused = ("triton", True) if backend == "triton" else ("sdpa", False)
    for size in args.pixel_sizes:
        d = PretrainingConfig.from_yaml(args.pixel_model).to_dict()
        d.update(attn_impl=impl, fused_ops=fused, objectives={"mlm": 1.0, "itm": 1.0})
        d["visual"]["max_grid"] = max(d["visual"]["max_grid"], 2 * size)  # any feature map fits
        cfg = PretrainingConfig.from_dict(d)
        batch = pixel_batch(cfg, args.pixel_batch, size, device)
        torch.manual_seed(0)
        model = ImageBERTForPretraining(cfg).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        step = amp_step(model, opt, lambda: model(**batch)["loss"], device, dtype)
        name = f"pixel_{size}"
        ms = time_steps({name: step})[name]
        visual = float(image_lengths(batch, cfg, training=True).sum())
        row = step_row(name, ms, batch, float(model.training_flops(batch)),
                       common.peak_memory_mb(step), image_tokens=visual)
        row.update(image_side=int(batch["pixel_values"].shape[-1]), pixel_batch=args.pixel_batch,
                   backbone=cfg.visual.backbone, sample_pixels=cfg.visual.sample_pixels)
        rows.append(row)
        del model, opt, step, batch
    return rows


# --- the HF-style baseline -----------------------------------------------------------------------
class HFCrossEncoder(nn.Module):
    """A padded eager BERT cross-encoder as a transformers user writes it: regions projected into
    ``inputs_embeds`` after the word embeddings, HF's pre-training heads (MLM + ITM), linear MOC
    and MRFR heads. Sizes from an ``PretrainingConfig``; losses as ours (masked ones on matched pairs
    only), computed the HF way (logits at every position, then the selection)."""

    def __init__(self, c: PretrainingConfig):
        super().__init__()
        from transformers import BertConfig, BertModel
        from transformers.models.bert.modeling_bert import BertPreTrainingHeads

        bc = BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                        intermediate_size=c.intermediate_size, hidden_act=c.hidden_act,
                        hidden_dropout_prob=c.hidden_dropout_prob,
                        attention_probs_dropout_prob=c.attention_probs_dropout_prob,
                        max_position_embeddings=c.max_position_embeddings,
                        type_vocab_size=c.type_vocab_size, layer_norm_eps=c.layer_norm_eps,
                        initializer_range=c.initializer_range, attn_implementation="eager")
        self.bert = BertModel(bc)
        self.heads = BertPreTrainingHeads(bc)
        self.heads.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        H = c.hidden_size
        self.region_proj = nn.Sequential(nn.Linear(c.region_feat_dim, H), nn.LayerNorm(H))
        self.loc_proj = nn.Sequential(nn.Linear(c.region_loc_dim, H), nn.LayerNorm(H))
        self.moc = nn.Linear(H, c.num_object_classes)
        self.mrfr = nn.Linear(H, c.region_feat_dim)
        self.max_len = c.max_position_embeddings

    def forward(self, batch: dict) -> torch.Tensor:
        """The summed MLM + ITM + MOC + MRFR loss of a batch-contract batch."""
        ids = batch["input_ids"]
        B, Lt = ids.shape
        masked = batch["region_masked"].bool()                                # (B, R)
        feats = batch["region_feats"].float()                                 # (B, R, D)
        if "mrfr_targets" in batch:  # older contract: the loader zeroed the masked features
            target = batch["mrfr_targets"].float()
        else:  # the batch carries the original features; mask them here
            target, feats = feats, feats.masked_fill(masked[..., None], 0.0)
        R = feats.shape[1]
        if Lt + R > self.max_len:
            raise ValueError(f"text {Lt} + regions {R} exceed max_position_embeddings {self.max_len}")
        region = self.region_proj(feats) + self.loc_proj(batch["region_boxes"].float())
        embeds = torch.cat([self.bert.embeddings.word_embeddings(ids), region], 1)  # (B, L, H)
        types = torch.cat([torch.zeros_like(ids), torch.ones(B, R, dtype=ids.dtype,
                                                             device=ids.device)], 1)
        attn = torch.cat([batch["attention_mask"], batch["region_mask"]], 1)  # (B, L)
        out = self.bert(inputs_embeds=embeds, attention_mask=attn, token_type_ids=types)
        seq = out.last_hidden_state                                           # (B, L, H)
        mlm_logits, itm_logits = self.heads(seq[:, :Lt], out.pooler_output)   # (B, Lt, V), (B, 2)
        matched = batch["itm_labels"] == 1
        mlm_labels = batch["mlm_labels"].masked_fill(~matched[:, None], -100)
        moc_labels = batch["moc_labels"].masked_fill(~matched[:, None], -100)
        regions = seq[:, Lt:]                                                 # (B, R, H)
        sel = masked & matched[:, None]
        loss = F.cross_entropy(mlm_logits.flatten(0, 1).float(), mlm_labels.flatten())
        loss = loss + F.cross_entropy(itm_logits.float(), batch["itm_labels"])
        loss = loss + F.cross_entropy(self.moc(regions).flatten(0, 1).float(), moc_labels.flatten())
        return loss + F.mse_loss(self.mrfr(regions)[sel].float(), target[sel])


def build_hf_baseline(cfg_dict: dict, batch: dict, dtype, device):
    """The baseline's training step on the same batch."""
    torch.manual_seed(0)
    model = HFCrossEncoder(PretrainingConfig.from_dict(cfg_dict)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return amp_step(model, opt, lambda: model(batch), device, dtype)


# --- the trainer's own step ----------------------------------------------------------------------
def trainer_config(args, model_cfg: str, data_dir: Path, out_dir: Path, objectives: dict,
                   backend: str) -> dict:
    """A one-stage run config (toy.yaml's structure) for the benchmark."""
    overrides = {"attn_impl": backend, "fused_ops": backend == "triton"}
    if args.regions > PretrainingConfig.from_yaml(model_cfg).max_regions:
        overrides["max_regions"] = args.regions
    return {
        "run": {"name": "bench_train", "out_dir": str(out_dir), "seed": 0},
        "model": {"config": model_cfg, "overrides": overrides},
        "data": {"batch_size": args.batch, "max_text_len": 40, "max_regions": args.regions,
                 "num_threads": args.threads},
        "optimizer": {"name": "adamw", "lr": 1.0e-4, "weight_decay": 0.01},
        "deepspeed": {"preset": str(REPO / "configs" / "ds" / f"zero{args.zero_stage}.yaml"),
                      "zero_stage": args.zero_stage, "bf16": args.dtype == "bf16",
                      "fp16": args.dtype == "fp16"},
        "checkpoint": {"every_steps": 0, "keep_last": 1},
        "wandb": {"mode": "disabled"},
        "log": {"every_steps": 1, "progress": False},
        "stages": [{"name": "bench", "steps": args.trainer_steps,
                    "warmup_steps": min(10, args.trainer_steps),
                    "sources": [{"path": str(data_dir), "ratio": 1.0}],
                    "objectives": objectives}],
    }


def run_trainer(args, model_cfg: str, objectives: dict, backend: str) -> dict:
    """Run the trainer in a subprocess (a world of one) and summarise its metrics.jsonl."""
    spec = synth.ShardSpec(2, 256, regions=args.regions)
    data_dir = synth.ensure_dataset(spec, args.data)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        cfg = trainer_config(args, model_cfg, data_dir, tmp / "run", objectives, backend)
        (tmp / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
        if not common.HAS_CUDA:
            env.pop("TRITON_INTERPRET", None)  # set by common for the kernels; the trainer uses sdpa
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
            env.pop(k, None)  # a world of one, whatever launched this script
        cmd = [sys.executable, "-m", "imagebert_ds.train", "--config", str(tmp / "run.yaml")]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=args.trainer_timeout)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise SystemExit(f"bench_train: the trainer failed (exit {proc.returncode}):\n{tail}")
        recs = [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines()
                if ln.strip()]
    recs = [r for r in recs if r.get("stage") == "bench" and "perf/step_s" in r]
    steps = recs[args.trainer_warmup:]
    if not steps:
        raise SystemExit(f"bench_train: the trainer logged {len(recs)} steps, none after the "
                         f"{args.trainer_warmup} warm-up steps")

    def med(key):
        vals = [r[key] for r in steps if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    wait = sum(r["perf/data_wait_frac"] * r["perf/step_s"] for r in steps)
    return {"backend": "trainer", "step_ms": 1e3 * med("perf/step_s"),
            "samples_per_s": med("perf/samples_per_s"), "tokens_per_s": med("perf/tokens_per_s"),
            "tflops": med("perf/tflops_per_device"), "mfu": med("perf/mfu"),
            "data_wait_frac": wait / sum(r["perf/step_s"] for r in steps),
            "peak_mem_mb": (1024 * recs[-1]["mem/peak_gb"] if common.HAS_CUDA else None),
            "trainer_backend": recs[0].get("backend"), "zero_stage": args.zero_stage,
            "precision": args.dtype, "steps_measured": len(steps),
            "steps_warmup": args.trainer_warmup, "data": spec.name}


# --- the run --------------------------------------------------------------------------------------
def plot(ax, rows: list[dict]) -> None:
    """Samples/s per row, the speed-up over the HF baseline annotated."""
    colours = {"hf_eager_baseline": "tab:orange", "trainer": "tab:green"}
    bars = ax.bar(range(len(rows)), [r["samples_per_s"] for r in rows],
                  color=[colours.get(r["backend"], "tab:purple" if r["backend"].startswith(
                      "pixel_") else "tab:blue") for r in rows])
    for b, r in zip(bars, rows):
        if r["speedup_vs_hf"] is None:  # a pixel row: its own batch
            continue
        ax.annotate(f"{r['speedup_vs_hf']:.2f}x HF", (b.get_x() + b.get_width() / 2,
                                                      b.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_xticks(range(len(rows)), [r["backend"] for r in rows], fontsize=8)
    ax.set_ylabel("samples/s")


def main() -> None:
    """Build the batch, time every row, print and write the results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model config (default: base on GPU, tiny on CPU)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--regions", type=int, default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--objectives", choices=["paper", "all"], default="paper",
                   help="paper: MLM + MOC + MRFR + ITM (as the baseline); all: + ITC")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=2)
    p.add_argument("--threads", type=int, default=2, help="the trainer's loader threads")
    p.add_argument("--trainer-steps", type=int, default=None, help="(30 smoke, 60)")
    p.add_argument("--trainer-warmup", type=int, default=None,
                   help="logged steps left out as warm-up (5 smoke, 10)")
    p.add_argument("--trainer-timeout", type=int, default=600)
    p.add_argument("--no-trainer", action="store_true", help="skip the trainer row")
    p.add_argument("--pixel-model", default=None,
                   help="Pixel-BERT model config (default: pixelbert_r50 on GPU, pixelbert_tiny "
                        "on CPU)")
    p.add_argument("--pixel-sizes", type=int, nargs="*", default=None,
                   help="shorter image sides of the pixel rows (384 800 on GPU, 32 smoke); "
                        "none: no pixel rows")
    p.add_argument("--pixel-batch", type=int, default=None, help="(8 GPU: the paper's per-GPU "
                   "batch at 800 px; 8 smoke)")
    p.add_argument("--data", default=None, help="cache folder for the trainer's shards")
    common.add_common_args(p)
    args = p.parse_args()
    smoke = args.smoke or not common.HAS_CUDA
    device = torch.device("cuda" if common.HAS_CUDA else "cpu")
    model_cfg = args.model or str(REPO / "configs" / "model" / ("tiny.yaml" if smoke else "base.yaml"))
    args.batch = args.batch or (8 if smoke else 64)
    args.regions = args.regions or (10 if smoke else 100)
    args.dtype = args.dtype or ("fp32" if device.type == "cpu" else "bf16")
    args.trainer_steps = args.trainer_steps or (30 if smoke else 60)
    args.pixel_model = args.pixel_model or str(
        REPO / "configs" / "model" / ("pixelbert_tiny.yaml" if smoke else "pixelbert_r50.yaml"))
    if args.pixel_sizes is None:
        args.pixel_sizes = [32] if smoke else [384, 800]
    args.pixel_batch = args.pixel_batch or 8
    args.trainer_warmup = args.trainer_warmup if args.trainer_warmup is not None else (5 if smoke else 10)
    dtype = DTYPES[args.dtype]
    # "all" = the paper's four + ITC: `cluster` needs the trainer's pseudo-labels (not in a
    # contract batch) and its periodic re-clustering would distort the step times
    names = [n for n in OBJECTIVES if n != "cluster"] if args.objectives == "all" \
        else list(DEFAULT_OBJECTIVES)
    objectives = {name: 1.0 for name in names}
    cfg_dict = PretrainingConfig.from_yaml(model_cfg).to_dict()
    # the shipped configs' dropout (attention 0.1: in-kernel for triton)
    cfg_dict.update(max_regions=max(args.regions, cfg_dict["max_regions"]), objectives=objectives)
    # captions of 10-40 tokens padded to the longest, 15% MLM / region masking, half mismatched
    batch = contract_batch(PretrainingConfig.from_dict(cfg_dict), args.batch, text_len=(10, 40),
                           regions=args.regions, generator=torch.Generator().manual_seed(0),
                           mlm_prob=0.15, region_mask_prob=0.15, with_probs=False, device=device)
    triton_ok = device.type == "cuda" and triton_available()
    backends = ["eager", "sdpa"] + (["triton"] if triton_ok else [])
    steps = {}
    for b in backends:
        steps[b], flops = build_backend(b, cfg_dict, batch, dtype, device)
    steps["hf_eager_baseline"] = build_hf_baseline(cfg_dict, batch, dtype, device)
    ms = time_steps(steps)
    # one FLOP count for every row: the useful work of this batch (the baseline does more)
    rows = [step_row(n, ms[n], batch, flops, common.peak_memory_mb(f)) for n, f in steps.items()]
    del steps
    if not args.no_trainer:
        rows.append(run_trainer(args, model_cfg, objectives, "triton" if triton_ok else "sdpa"))
    eager_ms = rows[0]["step_ms"]
    hf = next(r for r in rows if r["backend"] == "hf_eager_baseline")["samples_per_s"]
    for r in rows:
        r["speedup_vs_eager"] = eager_ms / r["step_ms"] if r["backend"] in backends else None
        r["speedup_vs_hf"] = r["samples_per_s"] / hf
    # Pixel-BERT rows: their own batch (images, not regions), so no speed-up over the baseline
    for r in build_pixel_rows(args, device, dtype, "triton" if triton_ok else "sdpa"):
        r["speedup_vs_eager"] = r["speedup_vs_hf"] = None
        rows.append(r)
    padded = batch["attention_mask"].numel() + batch["region_mask"].numel()
    real = int(batch["attention_mask"].sum() + batch["region_mask"].sum())
    shapes = {"model": Path(model_cfg).name, "batch": args.batch, "regions": args.regions,
              "text_len_max": batch["attention_mask"].shape[1], "dtype": str(dtype),
              "objectives": names, "padding_frac": 1 - real / padded,
              "trainer": {"zero_stage": args.zero_stage, "steps": args.trainer_steps,
                          "warmup_steps_excluded": args.trainer_warmup,
                          "loader_threads": args.threads,
                          "note": "same shape, its own batches: synthetic shards (5-30-word "
                                  "captions) through the real loader"},
              "pixel": {"model": Path(args.pixel_model).name, "sizes": args.pixel_sizes,
                        "batch": args.pixel_batch, "image_fit": "pad",
                        "objectives": ["mlm", "itm"],
                        "note": "TFLOP/s and MFU count the Transformer only, not the CNN"}}
    print(f"[bench_train] {common.device_name()} ({common.MODE}) {shapes}")
    common.print_table(rows, ["backend", "step_ms", "samples_per_s", "tokens_per_s", "tflops",
                              "mfu", "data_wait_frac", "peak_mem_mb", "speedup_vs_eager",
                              "speedup_vs_hf"])
    if not args.no_write:
        meta = {"shapes": shapes, "smoke": smoke, "loadavg": os.getloadavg()}
        if not common.HAS_CUDA:
            meta["note"] = ("cpu-smoke: the tiny model at smoke size in fp32 on the CPU; the "
                            "ratios between rows are the point, the times say nothing about a GPU")
        path = common.write_results("train_step", rows, meta, args.out_dir)
        common.save_plot(path, f"pre-training step: samples/s ({shapes['model']}, batch "
                               f"{args.batch}, {args.regions} regions, {args.dtype})",
                         lambda ax: plot(ax, rows))
        print("wrote", path)


if __name__ == "__main__":
    main()
