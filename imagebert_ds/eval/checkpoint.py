"""What ``--checkpoint`` may name, and how the model and its data settings are found from it.

Accepted (the trainer's run layout, docs/training.md):

* a ``save_pretrained`` directory (``config.yaml`` + ``model.safetensors``), e.g. a stage's
  ``<run>/<stage>/final/`` (which must then hold the trainer's ``COMPLETE`` marker);
* a run directory (``resolved_config.yaml``): its last stage's ``final/``;
* a stage directory ``<run>/<stage>``: its ``final/`` when complete, else its newest complete
  DeepSpeed checkpoint;
* a stage's ``checkpoints/`` folder (its ``latest`` complete tag) or one complete tag
  ``checkpoints/stepNNNNNNNN`` -- consolidated to fp32 weights as the trainer's export does.

Inside a run, the run's resolved config gives the tokenizer, ``max_text_len`` and
``max_regions`` the model was trained with, and the W&B project to log to. A bare model
directory uses the MiniLM tokenizer, ``max_text_len`` 40 and the model's ``max_regions`` unless
told otherwise.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from imagebert_ds.config_utils import ConfigError, from_dict

log = logging.getLogger(__name__)

RUN_CONFIG = "resolved_config.yaml"
COMPLETE = "COMPLETE"  # the trainer's marker (train/checkpoint.py)


@dataclass
class EvalCheckpoint:
    """A resolved ``--checkpoint``: a model directory or a DeepSpeed tag, and its run if any."""
    given: Path
    model_dir: Path | None = None  # save_pretrained folder
    tag_dir: Path | None = None  # <run>/<stage>/checkpoints/<tag>
    run_dir: Path | None = None
    run_cfg: object | None = None  # train.config.RunConfig
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


def _is_model_dir(p: Path) -> bool:
    return (p / "config.yaml").is_file() and (p / "model.safetensors").is_file()


def _load_run(run_dir: Path, required: bool):
    from imagebert_ds.config_utils import load_yaml
    from imagebert_ds.train.config import RunConfig

    path = run_dir / RUN_CONFIG
    try:
        return from_dict(RunConfig, load_yaml(path), source=str(path))
    except ConfigError as e:
        if required:
            raise
        log.warning("%s: ignored (%s): evaluating the model without its run's settings", path, e)
        return None


def resolve_checkpoint(path: str | os.PathLike) -> EvalCheckpoint:
    """Find the weights (and the run) that ``path`` names; errors say what is missing where."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise ValueError(f"checkpoint {p} is a file: pass the directory holding config.yaml and "
                         f"model.safetensors (save_pretrained), or a run directory")
    if _is_model_dir(p):
        ck = EvalCheckpoint(given=p, model_dir=p)
        run = p.parent.parent
        if (run / RUN_CONFIG).is_file():
            ck.run_dir, ck.stage = run, p.parent.name
            ck.run_cfg = _load_run(run, required=False)
            if p.name == "final" and not (p / COMPLETE).is_file():
                raise ValueError(f"checkpoint {p}: the export is incomplete (no {COMPLETE} "
                                 f"marker; the trainer writes it after the weights): finish the "
                                 f"run with --resume, or pass one of {p.parent / 'checkpoints'}'s "
                                 f"complete tags")
        return ck
    if (p / "config.yaml").is_file():
        raise ValueError(f"checkpoint {p}: config.yaml without model.safetensors (an interrupted "
                         f"save_pretrained?)")
    if (p / RUN_CONFIG).is_file():  # a run directory: its last stage
        cfg = _load_run(p, required=True)
        stage = cfg.stages[-1].name
        final = p / stage / "final"
        if not (final / COMPLETE).is_file():
            raise ValueError(f"run {p}: its last stage '{stage}' has no complete export "
                             f"({final / COMPLETE} missing): finish the run (pretrain --resume) "
                             f"or pass {p / stage} to evaluate its newest checkpoint")
        ck = resolve_checkpoint(final)
        return ck
    if (p.parent / RUN_CONFIG).is_file():  # a stage directory
        if (p / "final" / COMPLETE).is_file():
            return resolve_checkpoint(p / "final")
        return _from_tag_dir(p / "checkpoints", None, given=p)
    if (p / "latest").is_file() and (p.parent.parent / RUN_CONFIG).is_file():  # checkpoints/
        return _from_tag_dir(p, None, given=p)
    if (p.parent / "latest").is_file() or (p / COMPLETE).is_file():  # checkpoints/<tag>
        return _from_tag_dir(p.parent, p.name, given=p)
    raise ValueError(f"checkpoint {p}: not a model directory (config.yaml + model.safetensors), "
                     f"a run directory ({RUN_CONFIG}), a stage directory or a checkpoint tag")


def _from_tag_dir(ckpt_dir: Path, tag: str | None, given: Path) -> EvalCheckpoint:
    from imagebert_ds.train.checkpoint import CheckpointManager

    stage_dir = ckpt_dir.parent
    run = stage_dir.parent
    if not (run / RUN_CONFIG).is_file():
        raise ValueError(f"checkpoint {given}: a DeepSpeed checkpoint needs its run's "
                         f"{RUN_CONFIG} (looked in {run}) to rebuild the model")
    if tag is None:
        tag = CheckpointManager(ckpt_dir).latest_tag()
        if tag is None:
            raise ValueError(f"checkpoint {given}: no complete export ({stage_dir / 'final' / COMPLETE}"
                             f") and no complete checkpoint ({ckpt_dir / 'latest'})")
    elif not (ckpt_dir / tag / COMPLETE).is_file():
        raise ValueError(f"checkpoint {ckpt_dir / tag}: incomplete (no {COMPLETE} marker: the "
                         f"save was interrupted); pick a complete tag")
    cfg = _load_run(run, required=True)
    if stage_dir.name not in [s.name for s in cfg.stages]:
        raise ValueError(f"checkpoint {given}: stage '{stage_dir.name}' is not in {run / RUN_CONFIG}")
    return EvalCheckpoint(given=given, tag_dir=ckpt_dir / tag, run_dir=run, run_cfg=cfg,
                          stage=stage_dir.name)


def load_model(ck: EvalCheckpoint, device: str | torch.device = "cpu",
               attn_impl: str | None = None):
    """The ``ImageBERTForPretraining`` of ``ck`` in eval mode on ``device``."""
    from imagebert_ds.model import ImageBERTForPretraining

    if ck.model_dir is not None:
        overrides = [f"attn_impl={attn_impl}"] if attn_impl else None
        model = ImageBERTForPretraining.from_pretrained(ck.model_dir, overrides=overrides)
    else:
        cfg = ck.run_cfg
        stage = next(s for s in cfg.stages if s.name == ck.stage)
        model = ImageBERTForPretraining(cfg.model_config(stage, str(ck.run_dir / RUN_CONFIG)))
        sd = _deepspeed_state_dict(ck.tag_dir, cfg.deepspeed.zero_stage)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or set(missing) - set(model.tied_weights_keys):
            raise ValueError(f"checkpoint {ck.tag_dir}: weights do not match the run's model "
                             f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
        if attn_impl:
            model.bert.set_attn_impl(attn_impl)
    return model.to(device).eval()


def _deepspeed_state_dict(tag_dir: Path, zero_stage: int) -> dict:
    """fp32 weights of a DeepSpeed checkpoint tag (``train.checkpoint.consolidated_state_dict``
    without an engine: ZeRO >= 1 through ``zero_to_fp32``, ZeRO 0 from the module states)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag_dir.name)
    else:
        path = tag_dir / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise ValueError(f"checkpoint {tag_dir}: {path.name} missing")
        sd = torch.load(path, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def eval_data_config(ck: EvalCheckpoint, model_config, tokenizer: str | None = None,
                     max_text_len: int | None = None, max_regions: int | None = None):
    """The ``DataConfig`` that reads a test split for this model: the run's data settings when
    the checkpoint is in a run, else defaults; explicit arguments win."""
    from imagebert_ds.data import DataConfig

    data: dict = {}
    source = "evaluate defaults"
    if ck.run_cfg is not None:
        data = {k: v for k, v in ck.run_cfg.data.items() if k != "sources"}
        source = str(ck.run_dir / RUN_CONFIG)
    data.setdefault("region_feat_dim", model_config.region_feat_dim)
    if ck.run_cfg is None:
        data["max_regions"] = model_config.max_regions
        data["max_text_len"] = min(40, model_config.max_position_embeddings)
    for key, value in (("tokenizer", tokenizer), ("max_text_len", max_text_len),
                       ("max_regions", max_regions)):
        if value is not None:
            data[key] = value
    pixels = bool(getattr(model_config, "pixel_input", False))  # Pixel-BERT reads the .jpg
    data.update(use_regions=not pixels, use_images=pixels)
    cfg = from_dict(DataConfig, data, source=source)
    if cfg.max_text_len > model_config.max_position_embeddings:
        raise ConfigError(f"max_text_len {cfg.max_text_len} exceeds the model's "
                          f"max_position_embeddings ({model_config.max_position_embeddings})")
    return cfg


def split_fingerprint(path: str | os.PathLike) -> dict:
    """Identity of a split's shards for resume checks (names, sizes, mtimes)."""
    from imagebert_ds.data.shards import list_shards

    shards = list_shards(path)
    return {"split": str(Path(path).resolve()),
            "shards": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in shards]}
