"""Model config: strict YAML loading (unknown key / bad value name the key and file), sizes."""
from pathlib import Path

import pytest

from imagebert_ds.config_utils import ConfigError
from imagebert_ds.model import PretrainingConfig

from imagebert_ds.model.registry import CONFIG_DIR as CONFIGS


@pytest.mark.parametrize("name,sizes", [
    ("tiny", (2, 128, 4, 512)), ("base", (12, 768, 12, 3072)), ("large", (24, 1024, 16, 4096))])
def test_shipped_configs_load(name, sizes):
    c = PretrainingConfig.from_yaml(CONFIGS / f"{name}.yaml")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size) == sizes
    assert c.vocab_size == 30522 and c.region_feat_dim == 2048 and c.region_loc_dim == 5


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("hidden_size: 128\nnum_heads: 4\nhiden_size: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'hiden_size'"):
        PretrainingConfig.from_yaml(p)
    p.write_text("objectives:\n  moc: {varient: kl}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'moc\.varient'"):
        PretrainingConfig.from_yaml(p)
    p.write_text("objectives:\n  vqa: 1.0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: objectives: unknown objective 'vqa'"):
        PretrainingConfig.from_yaml(p)


def test_bad_values_are_actionable(tmp_path):
    p = tmp_path / "heads.yaml"
    p.write_text("hidden_size: 130\nnum_heads: 4\n")
    with pytest.raises(ConfigError, match=r"heads\.yaml.*hidden_size \(130\) must be divisible by num_heads \(4\)"):
        PretrainingConfig.from_yaml(p)
    p.write_text("attn_impl: flash\n")
    with pytest.raises(ConfigError, match=r"heads\.yaml.*'attn_impl' must be one of"):
        PretrainingConfig.from_yaml(p)
    p.write_text("objectives:\n  moc: {variant: mse}\n")
    with pytest.raises(ConfigError, match=r"heads\.yaml.*'moc\.variant' must be one of"):
        PretrainingConfig.from_yaml(p)
    p.write_text("objectives:\n  itm: {weight: -1}\n")
    with pytest.raises(ConfigError, match=r"heads\.yaml: objectives: itm: weight must be >= 0"):
        PretrainingConfig.from_yaml(p)


def test_objectives_default_and_shorthand():
    """No ``objectives``: ImageBERT's four tasks; a number is the weight; 0 switches one off."""
    assert list(PretrainingConfig().objectives) == ["mlm", "moc", "mrfr", "itm"]
    c = PretrainingConfig(objectives={"mlm": 2.0, "itc": {"embed_dim": 16}, "moc": 0})
    assert list(c.objectives) == ["mlm", "itc"]
    assert c.objectives["mlm"].weight == 2.0 and c.objectives["itc"].embed_dim == 16


def test_overrides_and_yaml_round_trip(tmp_path):
    c = PretrainingConfig.from_yaml(CONFIGS / "tiny.yaml", ["objectives={mlm: 1.0, moc: {variant: kl}}",
                                                          "num_layers=3"])
    assert c.objectives["moc"].variant == "kl" and c.num_layers == 3
    c.save_yaml(tmp_path / "c.yaml")
    assert PretrainingConfig.from_yaml(tmp_path / "c.yaml") == c


def test_from_bert_config(minilm_path):
    c = PretrainingConfig.from_bert_config(minilm_path, max_regions=10)
    assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size) == (6, 384, 12, 1536)
    assert c.max_regions == 10
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        PretrainingConfig.from_bert_config(minilm_path, bogus=1)


def test_model_registry(caplog):
    """Shipped model configs load by name; the former configs/model/NAME.yaml path still does,
    with a warning naming the new spelling; anything else is an error listing the names."""
    from imagebert_ds.model.registry import list_models, resolve_model_config

    assert {"tiny", "base", "large", "pixelbert_tiny", "pixelbert_r50"} <= set(list_models())
    assert PretrainingConfig.from_yaml("base").hidden_size == 768
    with caplog.at_level("WARNING"):
        old = resolve_model_config("configs/model/tiny.yaml")
    assert old == resolve_model_config("tiny") and "model.config: tiny" in caplog.text
    with pytest.raises(ConfigError, match="neither a file nor a shipped model .*tiny"):
        resolve_model_config("nope")
