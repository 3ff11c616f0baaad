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

import torch

log = logging.getLogger("imagebert_ds.train")

try:  # optional: apex is on no registry here; use it when present
    import apex.optimizers as _apex_optim  # type: ignore

    HAS_APEX = True
except Exception:  # noqa: BLE001 - any import failure means "not usable"
    _apex_optim = None
    HAS_APEX = False


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: with weight decay, and without (biases, LayerNorm weights; BERT's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


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
                        min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """BERT's schedule: linear warmup to ``peak_lr`` over ``warmup_steps``, then linear decay to
    ``min_lr`` at ``total_steps``. Step ``s`` (0-based) trains with the factor of ``s + 1`` during
    warmup, so the first update is never taken at LR 0."""
    floor = min_lr / peak_lr

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return max(floor, 1.0 - (1.0 - floor) * (s - warmup_steps) / span)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
