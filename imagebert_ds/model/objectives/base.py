"""The objective plug-in interface: one class per pre-training (or fine-tuning) task.

An objective owns everything of its task: its options (a ``Config`` dataclass whose ``weight`` is
the task's weight in the total loss), its head (the module's parameters), the batch keys it needs,
its loss, and the FLOPs its extra work costs. ``ImageBERTForPretraining`` runs the encoder once
over ``[CLS] text [SEP] | regions`` and hands every enabled objective the same
:class:`EncoderPass`; an objective whose inputs are absent from the batch is skipped.

Adding a task = one file with an ``Objective`` subclass + one line in ``objectives/__init__.py``'s
``REGISTRY`` (docs/training.md, "Adding an objective").
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # only for annotations: objectives are built by the model, not the other way
    from ..config import ImageBERTConfig
    from ..modeling import ImageBERTModel
    from ..visual import VisualFeatures


@dataclass
class ObjectiveConfig:
    """Options shared by every objective: its weight in the total loss (0 switches it off)."""
    weight: float = 1.0

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")

    def head_options(self) -> dict:
        """The options that shape the head (must stay equal when a head passes from stage to
        stage): by default every option but the weight."""
        from dataclasses import asdict

        return {k: v for k, v in asdict(self).items() if k != "weight"}


@dataclass
class EncoderPass:
    """What the shared encoder pass gives every objective.

    ``hidden`` (B, Lt + R, H) is the encoder output over ``[CLS] text [SEP] | regions``;
    ``text`` / ``regions`` are its two parts. ``matched`` (B,) marks the pairs whose caption
    belongs to the image (ImageBERT §4.2: masked losses count matched pairs only).
    ``region_targets`` (B, R) marks masked, real regions of matched pairs (MOC/MRFR targets), or
    is None without regions. With ``logits`` set (``return_logits=True``), objectives also store
    their full outputs there for inspection.
    """
    encoder: "ImageBERTModel"
    batch: dict[str, torch.Tensor]
    hidden: torch.Tensor
    text: torch.Tensor
    regions: torch.Tensor
    matched: torch.Tensor
    region_targets: Optional[torch.Tensor]
    logits: Optional[dict[str, torch.Tensor]] = field(default=None)
    #: every objective of the model by name, for one that uses another's head (ITM's hard
    #: negatives are mined with the ITC embeddings)
    objectives: Optional[dict[str, "Objective"]] = field(default=None)
    #: pixel / patch mode: the ``VisualFeatures`` (feature map (B, h, w, H) + padding mask) of
    #: ``batch["pixel_values"]`` that the joint pass read; every further pass over the batch's
    #: images reuses it (rows indexed) instead of running the CNN again
    visual_features: Optional["VisualFeatures"] = field(default=None)


class Objective(nn.Module, metaclass=abc.ABCMeta):
    """Base class: subclasses set ``name`` and ``Config`` and implement ``loss``.

    ``__init__(config, options, encoder)`` builds the head from the model config and the
    objective's options; ``encoder`` is passed for heads that tie weights to it (MLM) or run
    extra passes through it (ITC) — it is not stored as a submodule.
    """
    name: ClassVar[str]
    Config: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    #: batch keys that must all be present for the loss to be computed
    required_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: "ImageBERTConfig", options: ObjectiveConfig):
        super().__init__()
        self.options = options

    @property
    def weight(self) -> float:
        """This objective's weight in the total loss."""
        return self.options.weight

    def needs(self) -> tuple[str, ...]:
        """The batch keys this objective reads (its loss is skipped when one is absent)."""
        return self.required_keys

    def ready(self, batch: dict) -> bool:
        """True when every key of ``needs()`` is in the batch."""
        return all(batch.get(k) is not None for k in self.needs())

    @abc.abstractmethod
    def loss(self, p: EncoderPass) -> torch.Tensor:
        """The task's loss (a 0-dim float32 tensor) for one encoder pass."""

    def flops(self, batch: dict, config: "ImageBERTConfig", n_params: int) -> torch.Tensor | float:
        """Training FLOPs (forward + backward) this objective adds beyond the shared encoder
        pass, for ``batch`` (see ``imagebert_ds.train.metrics``); 0 for a small head."""
        return 0.0

    def tied_weight_keys(self) -> tuple[str, ...]:
        """Parameter names (relative to this module) that are tied to encoder weights."""
        return ()
