"""What a run directory records about itself: ``resolved_config.yaml``, read back by whoever
consumes the run (evaluation, the probe, fine-tuning) without the trainer's config classes.

The trainer writes its whole resolved config there, each stage with its full model config
(``stages[i].model``), so the record rebuilds every stage's model as it was trained, whatever
``configs/model/*.yaml`` holds now. Records of older runs (no ``stages[i].model``) rebuild it from
the model YAML they name (``compose_model_config``, the trainer's own rule).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from imagebert_ds.config_utils import ConfigError, from_dict, load_yaml
from imagebert_ds.run.layout import RUN_CONFIG


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` merged in, mapping by mapping (``over`` wins)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def compose_model_config(model_yaml: dict, yaml_source: str, overrides: dict,
                         stage_overrides: dict, objectives: Optional[dict], where: str) -> dict:
    """A stage's full model config as plain data: the model YAML + ``model.overrides`` +
    the stage's ``model_overrides`` + its objectives (set per stage only)."""
    for src, d in ((yaml_source, model_yaml), (f"{where}: model.overrides", overrides),
                   (f"{where}: model_overrides", stage_overrides)):
        if "objectives" in d:
            raise ConfigError(f"{src}: 'objectives' is set per stage in a run config "
                              f"(stages[i].objectives), not in the model config")
    data = deep_merge(copy.deepcopy(model_yaml), copy.deepcopy(overrides))
    data = deep_merge(data, copy.deepcopy(stage_overrides))
    data["objectives"] = copy.deepcopy(objectives)
    return data


@dataclass
class RunInfo:
    """The ``run:`` section as far as a consumer needs it."""
    name: str = "run"
    seed: int = 1234


@dataclass
class WandbInfo:
    """The run's W&B settings (``wandb:``)."""
    mode: str = "offline"
    project: str = "imagebert_ds"
    entity: Optional[str] = None


@dataclass
class StageRecord:
    """One stage: its name and full model config (plain data)."""
    name: str
    model: dict


@dataclass
class DeepSpeedInfo:
    zero_stage: int = 2


@dataclass
class RunRecord:
    """A run directory's ``resolved_config.yaml``, read for consumers of the run."""
    path: Path
    run: RunInfo = field(default_factory=RunInfo)
    wandb: WandbInfo = field(default_factory=WandbInfo)
    deepspeed: DeepSpeedInfo = field(default_factory=DeepSpeedInfo)
    data: dict = field(default_factory=dict)  # DataConfig keys shared by the stages
    stages: list[StageRecord] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunRecord":
        """Read ``run_dir/resolved_config.yaml``; a ConfigError names the file and the key."""
        path = Path(run_dir) / RUN_CONFIG
        raw = load_yaml(path)
        src = str(path)

        def section(name, tp):
            d = raw.get(name) or {}
            if not isinstance(d, dict):
                raise ConfigError(f"{src}: '{name}' must be a mapping")
            known = {f for f in tp.__dataclass_fields__}
            return from_dict(tp, {k: v for k, v in d.items() if k in known}, source=src,
                             prefix=f"{name}.")

        stages = raw.get("stages") or []
        if not isinstance(stages, list) or not stages:
            raise ConfigError(f"{src}: 'stages' must be a non-empty list")
        model = raw.get("model") or {}
        records = []
        for i, s in enumerate(stages):
            if not isinstance(s, dict) or "name" not in s:
                raise ConfigError(f"{src}: stages[{i}] has no name")
            m = s.get("model")
            if m is None:  # an older record: compose it from the model YAML it names
                from imagebert_ds.model.registry import resolve_model_config

                yaml_path = resolve_model_config(model.get("config", "tiny"))
                m = compose_model_config(load_yaml(yaml_path), str(yaml_path),
                                         model.get("overrides") or {},
                                         s.get("model_overrides") or {}, s.get("objectives"),
                                         f"{src}: stage {s['name']}")
            records.append(StageRecord(name=s["name"], model=m))
        data = raw.get("data") or {}
        return cls(path=path, run=section("run", RunInfo), wandb=section("wandb", WandbInfo),
                   deepspeed=section("deepspeed", DeepSpeedInfo), stages=records,
                   data={k: v for k, v in data.items() if k != "sources" and v is not None})

    @property
    def dir(self) -> Path:
        """The run directory."""
        return self.path.parent

    def stage(self, name: str) -> StageRecord:
        """The stage called ``name``."""
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"{self.path}: no stage '{name}' (stages: "
                          f"{[s.name for s in self.stages]})")

    def model_config(self, stage: StageRecord | str):
        """The ``PretrainingConfig`` ``stage`` was trained with."""
        from imagebert_ds.model import PretrainingConfig

        st = self.stage(stage) if isinstance(stage, str) else stage
        return from_dict(PretrainingConfig, copy.deepcopy(st.model),
                         source=f"{self.path}: stages '{st.name}' model")
