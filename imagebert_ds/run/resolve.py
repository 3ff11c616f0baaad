"""What ``--checkpoint`` and ``model.init_from`` may name, and the model found there.

``resolve_checkpoint`` accepts a ``save_pretrained`` folder (a stage's ``final/`` must hold
``COMPLETE``), a run directory (its last stage's ``final/``), a stage directory (``final/`` when
complete, else its newest complete checkpoint), a stage's ``checkpoints/`` or one complete tag,
which ``load_model`` consolidates to fp32 weights as the trainer's export does.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from imagebert_ds.config_utils import ConfigError
from imagebert_ds.run.checkpoint import CheckpointManager, consolidated_state_dict
from imagebert_ds.run.layout import (CHECKPOINTS, COMPLETE, FINAL, RUN_CONFIG, is_complete,
                                     is_model_dir, stage_dir)
from imagebert_ds.run.record import RunRecord

log = logging.getLogger(__name__)


@dataclass
class RunCheckpoint:
    """A resolved ``--checkpoint``: a model directory or a DeepSpeed tag, and its run if any."""
    given: Path
    model_dir: Path | None = None  # save_pretrained folder
    tag_dir: Path | None = None  # <run>/<stage>/checkpoints/<tag>
    run_dir: Path | None = None
    run_cfg: RunRecord | None = None
    stage: str | None = None

    @property
    def weights(self) -> Path:
        """The folder the weights come from."""
        return self.model_dir if self.model_dir is not None else self.tag_dir

    def describe(self) -> str:
        """One line for logs and the results JSON."""
        what = str(self.weights) + (" (DeepSpeed checkpoint)" if self.tag_dir is not None else "")
        return what if self.run_dir is None else f"{what}, run {self.run_dir} stage {self.stage}"

    def fingerprint(self) -> dict:
        """Identity of the weights for resume checks (path, file sizes and mtimes)."""
        files = sorted(p for p in self.weights.iterdir() if p.is_file())
        return {"checkpoint": str(self.weights.resolve()),
                "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files
                            if p.suffix in (".safetensors", ".pt", ".yaml")]}


def _load_run(run_dir: Path, required: bool) -> RunRecord | None:
    try:
        return RunRecord.load(run_dir)
    except ConfigError as e:
        if required:
            raise
        log.warning("%s: ignored (%s): using the model without its run's settings",
                    run_dir / RUN_CONFIG, e)
        return None


def resolve_init_from(path: Path, where: str = "model.init_from") -> Path:
    """The ``save_pretrained`` folder that ``model.init_from`` names: the folder itself, or a run
    directory's last stage's complete ``final/``."""
    path = Path(path)
    if is_model_dir(path):
        return path
    if (path / RUN_CONFIG).is_file():
        final = stage_dir(path, RunRecord.load(path).stages[-1].name) / FINAL
        if is_complete(final):
            return final
        raise ConfigError(f"{where}: {final} is not a finished export (no {COMPLETE} marker): "
                          "the run has not finished its last stage")
    raise ConfigError(f"{where}: {path} is neither a save_pretrained folder (config.yaml + "
                      f"model.safetensors) nor a run directory ({RUN_CONFIG})")


def resolve_checkpoint(path: str | os.PathLike) -> RunCheckpoint:
    """Find the weights (and the run) that ``path`` names; errors say what is missing where."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise ValueError(f"checkpoint {p} is a file: pass the directory holding config.yaml and "
                         f"model.safetensors (save_pretrained), or a run directory")
    if is_model_dir(p):
        ck = RunCheckpoint(given=p, model_dir=p)
        run = p.parent.parent
        if (run / RUN_CONFIG).is_file():
            ck.run_dir, ck.stage = run, p.parent.name
            ck.run_cfg = _load_run(run, required=False)
            if p.name == FINAL and not is_complete(p):
                raise ValueError(f"checkpoint {p}: the export is incomplete (no {COMPLETE} "
                                 f"marker; the trainer writes it after the weights): finish the "
                                 f"run with --resume, or pass one of {p.parent / CHECKPOINTS}'s "
                                 f"complete tags")
        return ck
    if (p / "config.yaml").is_file():
        raise ValueError(f"checkpoint {p}: config.yaml without model.safetensors (an interrupted "
                         f"save_pretrained?)")
    if (p / RUN_CONFIG).is_file():  # a run directory: its last stage
        stage = _load_run(p, required=True).stages[-1].name
        final = stage_dir(p, stage) / FINAL
        if not is_complete(final):
            raise ValueError(f"run {p}: its last stage '{stage}' has no complete export "
                             f"({final / COMPLETE} missing): finish the run (pretrain --resume) "
                             f"or pass {p / stage} to evaluate its newest checkpoint")
        return resolve_checkpoint(final)
    if (p.parent / RUN_CONFIG).is_file():  # a stage directory
        if is_complete(p / FINAL):
            return resolve_checkpoint(p / FINAL)
        return _from_tag_dir(p / CHECKPOINTS, None, given=p)
    if (p / "latest").is_file() and (p.parent.parent / RUN_CONFIG).is_file():  # checkpoints/
        return _from_tag_dir(p, None, given=p)
    if (p.parent / "latest").is_file() or is_complete(p):  # checkpoints/<tag>
        return _from_tag_dir(p.parent, p.name, given=p)
    raise ValueError(f"checkpoint {p}: not a model directory (config.yaml + model.safetensors), "
                     f"a run directory ({RUN_CONFIG}), a stage directory or a checkpoint tag")


def _from_tag_dir(ckpt_dir: Path, tag: str | None, given: Path) -> RunCheckpoint:
    sdir = ckpt_dir.parent
    run = sdir.parent
    if not (run / RUN_CONFIG).is_file():
        raise ValueError(f"checkpoint {given}: a DeepSpeed checkpoint needs its run's "
                         f"{RUN_CONFIG} (looked in {run}) to rebuild the model")
    if tag is None:
        tag = CheckpointManager(ckpt_dir).latest_tag()
        if tag is None:
            raise ValueError(f"checkpoint {given}: no complete export ({sdir / FINAL / COMPLETE}"
                             f") and no complete checkpoint ({ckpt_dir / 'latest'})")
    elif not is_complete(ckpt_dir / tag):
        raise ValueError(f"checkpoint {ckpt_dir / tag}: incomplete (no {COMPLETE} marker: the "
                         f"save was interrupted); pick a complete tag")
    cfg = _load_run(run, required=True)
    if sdir.name not in [s.name for s in cfg.stages]:
        raise ValueError(f"checkpoint {given}: stage '{sdir.name}' is not in {run / RUN_CONFIG}")
    return RunCheckpoint(given=given, tag_dir=ckpt_dir / tag, run_dir=run, run_cfg=cfg,
                         stage=sdir.name)


def load_model(ck: RunCheckpoint, device: str | torch.device = "cpu",
               attn_impl: str | None = None):
    """The ``ImageBERTForPretraining`` of ``ck`` in eval mode on ``device``."""
    from imagebert_ds.model import ImageBERTForPretraining

    if ck.model_dir is not None:
        overrides = [f"attn_impl={attn_impl}"] if attn_impl else None
        model = ImageBERTForPretraining.from_pretrained(ck.model_dir, overrides=overrides)
    else:
        cfg = ck.run_cfg
        model = ImageBERTForPretraining(cfg.model_config(ck.stage))
        sd = consolidated_state_dict(ck.tag_dir.parent, ck.tag_dir.name, cfg.deepspeed.zero_stage)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or set(missing) - set(model.tied_weights_keys):
            raise ValueError(f"checkpoint {ck.tag_dir}: weights do not match the run's model "
                             f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
        if attn_impl:
            model.bert.set_attn_impl(attn_impl)
    return model.to(device).eval()
