"""The DeepSpeed engine of a stage: its config section, the DeepSpeed config dict, and
``deepspeed.initialize`` with a fresh optimizer and warmup/decay schedule."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from imagebert_ds.run.record import deep_merge
from imagebert_ds.train.guard import skip_nonfinite_updates
from imagebert_ds.train.optim import build_optimizer, warmup_linear_decay


@dataclass
class DeepSpeedConfig:
    """ZeRO stage, precision, accumulation, clipping and memory savers (``build_ds_config``)."""
    # A YAML file under configs/ds/ holding keys of this section; keys given here win over it.
    preset: Optional[str] = None
    zero_stage: int = 2
    bf16: bool = False
    fp16: bool = False
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    # Merged as is into the DeepSpeed config dict (e.g. fp16.initial_scale_power, comms logging).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.bf16 and self.fp16:
            raise ValueError("deepspeed.bf16 and deepspeed.fp16 are both true: pick one precision")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("deepspeed.gradient_accumulation_steps must be >= 1")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")



def build_ds_config(ds_cfg: DeepSpeedConfig, micro_batch_size: int) -> dict:
    """The DeepSpeed config dict (optimizer and LR schedule come from ``build_engine``)."""
    d = ds_cfg
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": d.gradient_accumulation_steps,
        "gradient_clipping": d.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": d.bf16},
        "fp16": {"enabled": d.fp16, "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    return deep_merge(ds, copy.deepcopy(d.extra))


def build_engine(cfg: RunConfig, stage: StageConfig, model, device: torch.device,
                 micro_batch_size: int):
    """The DeepSpeed engine of one stage: fresh optimizer + warmup/decay schedule."""
    import deepspeed

    lr = stage.lr if stage.lr is not None else cfg.optimizer.lr
    optimizer = build_optimizer(model, cfg.optimizer, lr, cfg.deepspeed, device)
    d = cfg.deepspeed
    if d.zero_stage == 0 and not (d.fp16 or d.bf16):  # the one case DeepSpeed checks nothing
        skip_nonfinite_updates(optimizer)

    visual = model.config.visual

    def schedule(opt):  # DeepSpeed calls this with the optimizer it actually steps
        return warmup_linear_decay(opt, stage.warmup_steps, stage.steps, lr, stage.min_lr,
                                   visual.backbone_lr_mult, visual.freeze_backbone_steps)

    ds_config = build_ds_config(cfg.deepspeed, micro_batch_size)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=schedule, config=ds_config)
    return engine
