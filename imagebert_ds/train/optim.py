"""Optimizer construction: the fastest available implementation of AdamW / LAMB.

Order of preference (probed once at import, never required):
  * apex's FusedAdam / FusedLAMB when apex is installed and a GPU is present;
  * DeepSpeed's FusedAdam / FusedLamb on a GPU;
  * DeepSpeedCPUAdam when ZeRO offloads the optimizer to the CPU;
  * ``torch.optim.AdamW`` (foreach) otherwise — the CPU path the tests exercise.
Bias and LayerNorm weights get no weight decay (BERT's recipe).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

log = logging.getLogger("imagebert_ds.train")

try:  # optional: apex is on no registry here; use it when present
    import apex.optimizers as _apex_optim  # type: ignore

    HAS_APEX = True
except Exception:  # noqa: BLE001 - any import failure means "not usable"
    _apex_optim = None
    HAS_APEX = False


#: a peak LR above this is refused: an AdamW/LAMB update moves each weight by about the LR, so
#: no run trains there (BERT-style pre-training peaks at 1e-4 .. 1e-3)
MAX_LR = 1.0
#: a peak LR above this is accepted with a warning (the toy demo uses 1e-3)
WARN_LR = 1e-2


def check_lr(lr: float, key: str) -> None:
    """A peak learning rate: > 0, at most ``MAX_LR`` (error), a warning above ``WARN_LR``."""
    if not lr > 0:  # also NaN
        raise ValueError(f"{key} must be > 0, got {lr}")
    if lr > MAX_LR:
        raise ValueError(f"{key} = {lr:g} is above {MAX_LR:g}: each update would move a weight by "
                         f"about that much and the run diverges (pre-training uses 1e-4 .. 1e-3)")
    if lr > WARN_LR:
        log.warning("%s = %g is unusually high (above %g): expect divergence; the step guard "
                    "stops the run after training.max_bad_steps bad steps in a row", key, lr,
                    WARN_LR)


@dataclass
class OptimizerConfig:
    """AdamW (or LAMB on GPU) hyper-parameters; the peak LR may be set per stage."""
    name: Literal["adamw", "lamb"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6

    def __post_init__(self):
        check_lr(self.lr, "optimizer.lr")
        if len(self.betas) != 2:
            raise ValueError(f"optimizer.betas must have two values, got {self.betas}")



#: parameters of a Pixel-BERT CNN backbone (``visual.backbone_lr_mult``, ``freeze_backbone_steps``)
BACKBONE_PREFIX = "bert.embeddings.visual.backbone."


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """With and without weight decay (biases, LayerNorm / BatchNorm weights; BERT's recipe), each
    split again into the CNN backbone (``"backbone": True``, its own LR schedule) and the rest."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name \
            or name.endswith(".bias")
        groups.setdefault((name.startswith(BACKBONE_PREFIX), no_decay), []).append(p)
    return [{"params": groups.get((bb, nd), []), "weight_decay": 0.0 if nd else weight_decay,
             "backbone": bb}
            for bb in (False, True) for nd in (False, True) if (bb, nd) in groups or not bb]


def build_optimizer(model, opt_cfg, lr: float, ds_cfg, device: torch.device):
    """The fastest available AdamW / LAMB for this device and offload setting (module docstring)."""
    groups = param_groups(model, opt_cfg.weight_decay)
    kw = dict(lr=lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps)
    on_gpu = device.type == "cuda"
    if ds_cfg.offload_optimizer:
        if opt_cfg.name != "adamw":
            raise ValueError("optimizer.name=lamb cannot be offloaded: use adamw with "
                             "deepspeed.offload_optimizer")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    if opt_cfg.name == "adamw":
        if on_gpu and HAS_APEX:
            return _apex_optim.FusedAdam(groups, adam_w_mode=True, **kw)
        if on_gpu:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kw)
        return torch.optim.AdamW(groups, foreach=True, **kw)
    # LAMB (You et al.): large-batch BERT pre-training.
    if on_gpu and HAS_APEX:
        return _apex_optim.FusedLAMB(groups, **kw)
    if on_gpu:
        from deepspeed.ops.lamb import FusedLamb

        return FusedLamb(groups, **kw)
    raise ValueError("optimizer.name=lamb needs a GPU (apex FusedLAMB or DeepSpeed FusedLamb); "
                     "use adamw on the CPU")


def warmup_linear_decay(optimizer, warmup_steps: int, total_steps: int, peak_lr: float,
                        min_lr: float = 0.0, backbone_lr_mult: float = 1.0,
                        freeze_backbone_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """BERT's schedule: linear warmup to ``peak_lr`` over ``warmup_steps``, then linear decay to
    ``min_lr`` at ``total_steps``. Step ``s`` (0-based) trains with the factor of ``s + 1`` during
    warmup, so the first update is never taken at LR 0. Groups marked ``backbone`` (a CNN,
    ``param_groups``) follow the same curve times ``backbone_lr_mult``, at LR 0 (frozen: AdamW's
    decoupled weight decay is scaled by the LR too) for the first ``freeze_backbone_steps``."""
    floor = min_lr / peak_lr

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return max(floor, 1.0 - (1.0 - floor) * (s - warmup_steps) / span)

    def backbone(s: int) -> float:
        return 0.0 if s < freeze_backbone_steps else backbone_lr_mult * factor(s)

    lambdas = [backbone if g.get("backbone") else factor for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
