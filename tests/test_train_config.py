"""Run-config validation: bad configs fail before any process group starts, naming the problem."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imagebert_ds.config_utils import ConfigError
from imagebert_ds.train.config import build_ds_config, load_run_config

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "runs" / "toy.yaml"


def toy_with(tmp_path, **changes) -> Path:
    """configs/runs/toy.yaml with data paths that exist, plus ``changes`` (dotted keys)."""
    data = yaml.safe_load(TOY.read_text())
    for st in data["stages"]:
        st["sources"] = [{"path": str(tmp_path), "ratio": 1.0}]
    data["eval"]["retrieval_split"] = str(tmp_path)
    data["run"]["out_dir"] = str(tmp_path / "run")
    for key, value in changes.items():
        node = data
        parts = key.split("__")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[parts[-1]] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_toy_config_loads(tmp_path):
    cfg = load_run_config(toy_with(tmp_path))
    assert [s.name for s in cfg.stages] == ["stage1_web", "stage2_clean"]
    assert cfg.deepspeed.zero_stage == 2  # from the preset
    mcfg = cfg.model_config(cfg.stages[0])
    assert mcfg.pretraining.itc.enabled and mcfg.pretraining.mrfr.weight == 1.0
    ds = build_ds_config(cfg, cfg.stages[1], 32)
    assert ds["zero_optimization"]["stage"] == 2
    assert "scheduler" not in ds  # the trainer passes its own warmup + linear decay
    assert cfg.data_config(cfg.stages[0]).batch_size == 32


def test_overrides_are_typed(tmp_path):
    cfg = load_run_config(toy_with(tmp_path), ["stages.0.steps=7", "stages.0.warmup_steps=1", "optimizer.lr=3e-4",
                                               "deepspeed.zero_stage=3"])
    assert cfg.stages[0].steps == 7 and cfg.optimizer.lr == 3e-4 and cfg.deepspeed.zero_stage == 3
    with pytest.raises(ConfigError, match="'stages\\[0\\].steps' must be an integer"):
        load_run_config(toy_with(tmp_path), ["stages.0.steps=many"])


@pytest.mark.parametrize("changes,overrides,needle", [
    ({"optimizer__lrr": 1.0}, [], "unknown key 'optimizer.lrr'"),
    ({}, ["deepspeed.zero_stage=4"], "zero_stage must be 0, 1, 2 or 3"),
    ({}, ["deepspeed.fp16=true", "deepspeed.bf16=true"], "bf16 and deepspeed.fp16 are both true"),
    ({"stages__0__sources": [{"path": "/nonexistent/shards"}]}, [], "/nonexistent/shards does not exist"),
    ({"model__overrides": {"hidden_sise": 8}}, [], "unknown key 'hidden_sise'"),
    ({"data__mlm_probb": 0.2}, [], "unknown key 'mlm_probb'"),
    ({"stages__1__objectives": {"mlm": 1.0, "vqa": 1.0}}, [], "unknown objective 'vqa'"),
])
def test_bad_config_named(tmp_path, changes, overrides, needle):
    path = toy_with(tmp_path, **changes)
    with pytest.raises(ConfigError) as e:
        load_run_config(path, overrides)
    assert needle in str(e.value)


def test_bad_config_fails_before_launch(tmp_path):
    """The CLI refuses a bad config without starting the launcher or any rank."""
    path = toy_with(tmp_path)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "imagebert_ds", "pretrain", "--nproc", "2",
                        "--config", str(path), "--set", "deepspeed.zero_stage=4"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "zero_stage must be 0, 1, 2 or 3" in p.stderr and str(path) in p.stderr
    assert "deepspeed.launcher" not in p.stdout + p.stderr  # no launcher command was run
    assert not (tmp_path / "run").exists()
    assert time.time() - t0 < 60


def test_warmup_linear_decay():
    import torch

    from imagebert_ds.train.optim import warmup_linear_decay

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_linear_decay(opt, warmup_steps=4, total_steps=12, peak_lr=1.0, min_lr=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]  # no step at LR 0, peak after warmup
    assert abs(lrs[8] - (1 - 0.9 * 4 / 8)) < 1e-12 and min(lrs) >= 0.1
