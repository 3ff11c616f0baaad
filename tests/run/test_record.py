"""The run record (resolved_config.yaml): self-contained, and records of older runs still read."""
import logging

import pytest
import yaml

from imagebert_ds.config_utils import ConfigError, to_dict
from imagebert_ds.run.record import RunRecord
from imagebert_ds.train.config import load_run_config


@pytest.fixture
def record_dir(tmp_path):
    cfg = load_run_config("configs/runs/toy.yaml", check_data=False)
    (tmp_path / "resolved_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return cfg, tmp_path


def test_record_rebuilds_each_stage_model(record_dir):
    cfg, d = record_dir
    rec = RunRecord.load(d)
    assert [s.name for s in rec.stages] == [s.name for s in cfg.stages]
    for stage in cfg.stages:
        assert rec.model_config(stage.name) == cfg.model_config(stage)
    assert rec.run.seed == cfg.run.seed and rec.wandb.project == cfg.wandb.project
    assert rec.deepspeed.zero_stage == cfg.deepspeed.zero_stage
    assert rec.data["max_regions"] == 4 and "sources" not in rec.data


def test_record_is_self_contained(record_dir):
    """The stage's model comes from the record, not from the model YAML it names."""
    _, d = record_dir
    raw = yaml.safe_load((d / "resolved_config.yaml").read_text())
    raw["stages"][1]["model"]["num_object_classes"] = 7
    (d / "resolved_config.yaml").write_text(yaml.safe_dump(raw))
    rec = RunRecord.load(d)
    assert rec.model_config(rec.stages[1]).num_object_classes == 7
    assert rec.model_config(rec.stages[0]).num_object_classes == 24


def test_record_of_an_older_run(record_dir, caplog):
    """No stages[i].model and the former configs/model/NAME.yaml path: composed as the trainer
    did, with a warning naming the new spelling."""
    cfg, d = record_dir
    raw = yaml.safe_load((d / "resolved_config.yaml").read_text())
    raw["model"]["config"] = "configs/model/tiny.yaml"
    for s in raw["stages"]:
        del s["model"]
    (d / "resolved_config.yaml").write_text(yaml.safe_dump(raw))
    with caplog.at_level(logging.WARNING):
        rec = RunRecord.load(d)
    assert "model.config: tiny" in caplog.text
    assert rec.model_config("stage2_clean") == cfg.model_config(cfg.stages[1])
    with pytest.raises(ConfigError, match="no stage 'nope'"):
        rec.stage("nope")
