"""The step guard: a non-finite loss or gradient never reaches the weights, and a run that keeps
producing them stops with an error instead of "finishing".

Who skips a bad update, by configuration (DeepSpeed 0.19):

* fp16 (any ZeRO stage): the loss scaler sees the overflow, skips the step and lowers the scale;
* ZeRO 1-3 in fp32/bf16 and bf16 at ZeRO 0: DeepSpeed's optimizers compute the global gradient
  norm before the update and skip the step when it is not finite (``check_grad_overflow``);
* fp32 at ZeRO 0: DeepSpeed steps the client optimizer directly and checks nothing, so
  ``skip_nonfinite_updates`` gives that optimizer the same check (its gradients are all-reduced
  by then, so every rank decides alike) and the ``overflow`` flag that DeepSpeed's engine reads:
  a skipped step is counted in ``engine.skipped_steps``, leaves the LR schedule where it was, and
  ``engine.was_step_applied()`` is False — exactly as for DeepSpeed's own optimizers.

A non-finite *loss* whose gradients are finite (a NaN or inf term that no gradient flows
through) would slip past all of these checks, which look at gradients only. When the ranks agree
that a micro-batch loss was non-finite, ``poison_gradients`` therefore writes NaN into the
accumulated gradient of the word embeddings before ``engine.step()``, so that the step is skipped
by the same path as a non-finite gradient on every ZeRO stage and precision (fp16 also lowers its
loss scale).

``StepGuard`` then counts consecutive bad steps (a non-finite loss, or an update that was not
applied) and raises ``TrainingError`` — naming the stage, the step and the per-task losses — at
``training.max_bad_steps`` of them in a row; the last complete checkpoint was written before any
of them and stays the one to resume from. ``check_finite_weights`` is the last line: an export
with a non-finite weight is refused.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from imagebert_ds.runtime.errors import TrainingError

log = logging.getLogger("imagebert_ds.train")


@dataclass
class TrainingConfig:
    """When the trainer gives up on a run whose steps go bad (``imagebert_ds/train/guard.py``).

    A bad step has a non-finite loss on some rank, or an update that DeepSpeed did not apply
    (a non-finite gradient norm: fp16 overflow, or NaN/inf gradients in fp32/bf16 on any ZeRO
    stage); its update never reaches the weights. ``max_bad_steps`` of them in a row stop the run
    with an error naming the stage, the step and the task losses (exit code 1, no export; the last
    complete checkpoint stays loadable). fp16 skips a step or two while its loss scale settles,
    hence a default above 1.
    """
    max_bad_steps: int = 5
    # the old key (resolved configs of earlier runs hold it): the run stopped after MORE than
    # this many non-finite steps, i.e. max_bad_steps = max_nonfinite_steps + 1
    max_nonfinite_steps: Optional[int] = None

    def __post_init__(self):
        if self.max_nonfinite_steps is not None:
            import logging

            logging.getLogger(__name__).warning(
                "training.max_nonfinite_steps is deprecated: read as training.max_bad_steps = "
                "%d", self.max_nonfinite_steps + 1)
            self.max_bad_steps, self.max_nonfinite_steps = self.max_nonfinite_steps + 1, None
        if self.max_bad_steps < 1:
            raise ValueError(f"training.max_bad_steps must be >= 1, got {self.max_bad_steps}")



def skip_nonfinite_updates(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` a no-op when any gradient is NaN/inf, recording it in
    ``optimizer.overflow`` (read by DeepSpeed's engine after the step). One fused norm per
    parameter list and one host read per optimizer step. Returns the optimizer."""
    inner = optimizer.step

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(
            torch.stack(torch._foreach_norm(grads)).isfinite().all())
        if self.overflow:
            return None
        return inner(closure) if closure is not None else inner()

    optimizer.overflow = False
    # a bound method: torch's LR scheduler wraps ``step`` through its ``__func__``
    optimizer.step = types.MethodType(step, optimizer)
    return optimizer


def poison_gradients(param: torch.nn.Parameter) -> None:
    """Make the accumulated gradient of ``param`` NaN (all ranks call it, after the last backward
    of the step, before ``engine.step()``), so that DeepSpeed — or ``skip_nonfinite_updates`` at
    fp32 ZeRO 0 — skips the update. ``param`` must receive a gradient in every step (the word
    embeddings): ZeRO-3 overwrites a gradient buffer only when its parameter gets a new gradient,
    so NaN left in an unused one would skip every later step too. Written through DeepSpeed's
    ``safe_set_*_grad``, which reach the gradient wherever the ZeRO stage keeps it."""
    from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of the fp32 gradient
        safe_set_local_grad(param, torch.full((param.ds_tensor.numel(),), float("nan"),
                                              device=param.device))
    else:
        safe_set_full_grad(param, torch.full(param.shape, float("nan"), device=param.device))


class StepGuard:
    """Counts bad optimizer steps of one stage and stops the run at ``limit`` in a row."""

    def __init__(self, stage: str, limit: int, ckpt_dir):
        self.stage, self.limit, self.ckpt_dir = stage, limit, ckpt_dir
        self.consecutive = 0
        self.total = 0  # bad steps of this process's part of the stage (metrics: bad_steps)

    def update(self, step: int, loss_nonfinite: bool, applied: bool,
               losses: Callable[[], dict]) -> None:
        """Record optimizer step ``step`` (1-based): its loss was non-finite on some rank, and
        whether DeepSpeed applied the update. ``losses()`` gives the task losses for the error
        (it is only called for a bad step). Same inputs on every rank, so all ranks stop alike."""
        if not loss_nonfinite and applied:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        why = "non-finite loss" if loss_nonfinite else "non-finite gradient norm (update skipped)"
        if self.consecutive >= self.limit:
            raise TrainingError(
                f"stage {self.stage} step {step}: {why}; {self.consecutive} bad step(s) in a row "
                f"(training.max_bad_steps={self.limit}); task losses {_fmt(losses())}. No update "
                f"of a bad step was applied; {self._where_to_resume()}")
        log.warning("stage %s step %d: %s, step skipped (%d in a row, %d allowed)", self.stage,
                    step, why, self.consecutive, self.limit - 1)

    def _where_to_resume(self) -> str:
        latest = Path(self.ckpt_dir) / "latest"
        if latest.is_file():
            return f"the last complete checkpoint is {self.ckpt_dir}/{latest.read_text().strip()}"
        return f"no checkpoint of stage {self.stage} was written yet"


def check_finite_weights(state_dict: dict, where: str) -> None:
    """Raise ``TrainingError`` naming the first tensor of ``state_dict`` holding NaN/inf."""
    for name, t in state_dict.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise TrainingError(f"{where}: weight '{name}' is not finite; refusing to export a "
                                "diverged model (resume from an earlier checkpoint with a lower "
                                "learning rate)")


def _fmt(losses: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:.4g}" for k, v in losses.items()) + "}"
