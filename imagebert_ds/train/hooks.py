"""Stage hooks: the per-stage components that an objective brings into the training loop.

Some objectives need more than the loader's batch: deep multimodal clustering re-clusters the
data every few steps and labels each micro-batch (``relation/pseudo_labels.py``). Such an objective
names a hook in ``STAGE_HOOKS``; the trainer builds the hooks of a stage's objectives
(``build_stage_hooks``) and drives them all through one :class:`StageHooks`, never naming an
objective (torchtitan's components: the loop calls ``hooks.on_step``, not ``if feature:``).

A hook is any object with the :class:`StageHook` methods; hooks live outside ``train/`` and need
not import it.
"""
from __future__ import annotations

import importlib
from typing import Protocol

import torch

#: objective name -> "module:factory" of its stage hook, imported only when a stage runs that
#: objective. ``factory(options, data_cfg=, rank=, world=, device=, seed=)`` gets the objective's
#: Config, the stage's DataConfig, this rank of ``world``, its device and the run seed.
STAGE_HOOKS: dict[str, str] = {
    "cluster": "imagebert_ds.relation.pseudo_labels:ClusterHook",
}


class StageHook(Protocol):
    """What the trainer calls on a hook; every rank calls every method at the same points."""

    def on_step(self, step: int, model: torch.nn.Module) -> None:
        """At a step boundary, ``step`` optimizer steps done (0 before the first)."""

    def batch_inputs(self, model: torch.nn.Module, batch: dict) -> dict:
        """Extra model inputs for a training micro-batch (``batch`` as the loader made it)."""

    def pop_log(self) -> dict:
        """Metrics since the last call, merged into the next logged record."""

    def state_dict(self) -> dict:
        """This rank's state, saved in its checkpoint (``rank_state``)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()`` on resume."""


_METHODS = ("on_step", "batch_inputs", "pop_log", "state_dict", "load_state_dict")


def missing_methods(hook) -> list[str]:
    """The :class:`StageHook` methods that ``hook`` (an object or a class) lacks."""
    return [m for m in _METHODS if not callable(getattr(hook, m, None))]


class StageHooks:
    """The hooks of one stage by objective name, driven together in ``STAGE_HOOKS`` order."""

    def __init__(self, hooks: dict[str, StageHook] | None = None):
        self.hooks = dict(hooks or {})
        for name, hook in self.hooks.items():
            missing = missing_methods(hook)
            if missing:
                raise TypeError(f"stage hook of '{name}' ({type(hook).__name__}) lacks {missing}")

    def on_step(self, step: int, model) -> None:
        """Every hook's ``on_step``."""
        for hook in self.hooks.values():
            hook.on_step(step, model)

    def batch_inputs(self, model, batch: dict) -> dict:
        """The hooks' extra inputs together; two hooks giving the same key is an error."""
        out: dict = {}
        for name, hook in self.hooks.items():
            extra = hook.batch_inputs(model, batch)
            clash = set(extra) & set(out)
            if clash:
                raise RuntimeError(f"stage hook of '{name}' gives inputs {sorted(clash)} that "
                                   "another hook gives too")
            out.update(extra)
        return out

    def pop_log(self) -> dict:
        """Every hook's ``pop_log`` in one record."""
        rec: dict = {}
        for hook in self.hooks.values():
            rec.update(hook.pop_log())
        return rec

    def state_dict(self) -> dict:
        """``{objective name: hook state}``, the ``"hooks"`` entry of a rank state."""
        return {name: hook.state_dict() for name, hook in self.hooks.items()}

    def load_state_dict(self, rank_state: dict) -> None:
        """Restore each hook from a checkpoint's rank state: from its ``"hooks"`` entry, or, in a
        checkpoint written before stage hooks, from the top-level key of the objective's name
        (``"cluster"``)."""
        states = rank_state.get("hooks", rank_state)
        for name, hook in self.hooks.items():
            if name not in states:
                raise KeyError(f"the checkpoint holds no state for the '{name}' stage hook")
            hook.load_state_dict(states[name])


def build_stage_hooks(objectives: dict, data_cfg, rank: int, world: int, device: torch.device,
                      seed: int, registry: dict[str, str] = STAGE_HOOKS) -> StageHooks:
    """The hooks a stage's objectives (``{name: Config}``) need, from ``registry``."""
    hooks = {}
    for name, target in registry.items():
        if name not in objectives:
            continue
        module, _, attr = target.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        hooks[name] = factory(objectives[name], data_cfg=data_cfg, rank=rank, world=world,
                              device=device, seed=seed)
    return StageHooks(hooks)
