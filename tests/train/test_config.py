"""Run-config validation: bad configs fail before any process group starts, naming the problem."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imagebert_ds.config_utils import ConfigError
from imagebert_ds.train.config import load_run_config
from imagebert_ds.train.engine import build_ds_config

REPO = Path(__file__).resolve().parents[2]
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
    assert list(mcfg.objectives) == ["mlm", "moc", "mrfr", "itm", "itc"]
    assert mcfg.objectives["itc"].embed_dim == 64 and mcfg.objectives["mrfr"].weight == 1.0
    ds = build_ds_config(cfg.deepspeed, 32)
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
    ({"data__mlm_probb": 0.2}, [], "unknown key 'data.mlm_probb'"),
    ({"stages__1__objectives": {"mlm": 1.0, "vqa": 1.0}}, [], "unknown objective 'vqa'"),
    ({"stages__1__objectives": {"mlm": 0.0}}, [], "no objective has a weight > 0"),
    ({"model__overrides": {"objectives": {"mlm": 1.0}}}, [],
     "model.overrides: 'objectives' is set per stage in a run config"),
    ({}, ["data.max_regions=40"], "data.max_regions (40) exceeds the model max_regions"),
    ({}, ["data.region_feat_dim=1024"], "data.region_feat_dim (1024) differs from the model's region_feat_dim (2048"),
    ({}, ["data.max_text_len=200"], "data.max_text_len (200) exceeds the model's max_position_embeddings (128"),
    ({}, ["model.overrides.vocab_size=1000"], "has 30522 tokens, more than the model's vocab_size (1000"),
    ({}, ["model.overrides.mask_token_id=104"], "gives [MASK] id 103, the model's mask_token_id is 104"),
    ({}, ["model.overrides.attn_impl=triton", "model.overrides.num_heads=8", "model.overrides.hidden_size=40"],
     "attn_impl 'triton' cannot run this model (hidden_size 40 / num_heads 8): head dim 5"),
    ({}, ["data.use_images=true"], "data.use_images is true, but the model's visual.mode is 'region'"),
    ({"stages__0__objectives": {"mlm": 1.0, "itm": 1.0}, "stages__1__objectives": {"mlm": 1.0, "itm": 1.0}},
     ["model.overrides.visual.mode=pixel"], "visual.mode 'pixel' (tiny) reads pixel_values: set data.use_images: true"),
    ({"stages__0__objectives": {"mlm": 1.0, "itm": 1.0}, "stages__1__objectives": {"mlm": 1.0, "itm": 1.0}},
     ["model.overrides.visual.mode=patch", "data.use_images=true"], "reads no detector regions: set data.use_regions: false"),
    ({}, ["model.overrides.visual.mode=pixel", "data.use_images=true", "data.use_regions=false"],
     "objectives.moc needs detector regions, but visual.mode is 'pixel'"),
    ({}, ["stages.1.objectives.itc.embed_dim=32"], "objectives.itc options differ"),
    ({"stages__1__objectives": {"mlm": 1.0, "itc": {"embed_dim": 64}}}, [],
     "eval.retrieval_split scores pairs with the ITM head, but the last stage 'stage2_clean' has no itm"),
    ({}, ["training.max_bad_steps=0"], "training.max_bad_steps must be >= 1"),
    ({}, ["optimizer.lr=1e6"], "optimizer.lr = 1e+06 is above 1"),
    ({}, ["stages.1.lr=2.0"], "stages 'stage2_clean' lr = 2 is above 1"),
    ({}, ["log.every_steps=0"], "log.every_steps must be >= 1"),
])
def test_bad_config_named(tmp_path, changes, overrides, needle):
    path = toy_with(tmp_path, **changes)
    with pytest.raises(ConfigError) as e:
        load_run_config(path, overrides)
    assert needle in str(e.value)


def test_stage_objectives_own_tasks_and_weights(tmp_path):
    """A stage's ``objectives`` is the only owner of what runs: omitted -> ImageBERT's four tasks
    (no ITC), weight 0 -> off, other stages unaffected."""
    cfg = load_run_config(toy_with(tmp_path, stages__0__objectives=None),
                          ["stages.1.objectives.moc=0"])
    assert list(cfg.model_config(cfg.stages[0]).objectives) == ["mlm", "moc", "mrfr", "itm"]
    assert list(cfg.model_config(cfg.stages[1]).objectives) == ["mlm", "mrfr", "itm", "itc"]
    # the data side takes the feature width from the model (its one owner)
    assert cfg.data_config(cfg.stages[0]).region_feat_dim == 2048


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "runs").glob("*.yaml")))
def test_shipped_run_configs_pass_every_check(name):
    """Dry load of every shipped run config (data paths and the BERT folder are the user's)."""
    cfg = load_run_config(REPO / "configs" / "runs" / name, ["model.init_from_bert=null"],
                          check_data=False)
    for stage in cfg.stages:
        assert "itm" in cfg.model_config(stage).objectives


def test_fp16_needs_a_gpu(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="deepspeed.fp16 needs a CUDA device"):
        load_run_config(toy_with(tmp_path), ["deepspeed.fp16=true"])


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


def test_old_max_nonfinite_steps_key_still_loads():
    """Resolved configs of runs from before training.max_bad_steps keep loading (evaluate,
    resume): 'stop after more than N' is max_bad_steps = N + 1."""
    from imagebert_ds.config_utils import from_dict
    from imagebert_ds.train.guard import TrainingConfig

    t = from_dict(TrainingConfig, {"max_nonfinite_steps": 0})
    assert t.max_bad_steps == 1 and t.max_nonfinite_steps is None


def test_stage_data_overrides(tmp_path):
    """A stage's data_overrides change its data config only; sources stay per stage."""
    cfg = load_run_config(toy_with(tmp_path, stages__1__data_overrides={"itm_neg_prob": 0.0}))
    assert cfg.data_config(cfg.stages[0]).itm_neg_prob == 0.5
    assert cfg.data_config(cfg.stages[1]).itm_neg_prob == 0.0
    with pytest.raises(ConfigError, match="unknown key 'itm_neg_probb'"):
        load_run_config(toy_with(tmp_path, stages__1__data_overrides={"itm_neg_probb": 0.0}))
    with pytest.raises(ConfigError, match="data_overrides cannot set sources"):
        load_run_config(toy_with(tmp_path, stages__1__data_overrides={"sources": []}))
