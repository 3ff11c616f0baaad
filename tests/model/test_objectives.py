"""Objectives as plug-ins: a new task is one class plus one registry line, and the model's
forward, config parsing, input keys and FLOP count pick it up (the docs/training.md sketch)."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from imagebert_ds.config_utils import ConfigError
from imagebert_ds.model import PretrainingConfig, ImageBERTForPretraining
from imagebert_ds.model import losses as L
from imagebert_ds.model.objectives import REGISTRY, EncoderPass, Objective, ObjectiveConfig
from imagebert_ds.testing import contract_batch


@dataclass
class CaptionLengthConfig(ObjectiveConfig):
    buckets: int = 8


class CaptionLength(Objective):
    """Predict a bucketed caption length from the pooled [CLS] (the docs' toy task)."""
    name = "caplen"
    Config = CaptionLengthConfig
    required_keys = ("attention_mask",)

    def __init__(self, config, options, encoder):
        super().__init__(config, options)
        self.head = nn.Linear(config.hidden_size, options.buckets)

    def loss(self, p: EncoderPass) -> torch.Tensor:
        lens = p.batch["attention_mask"].sum(1)
        target = (lens * self.options.buckets // (lens.max() + 1)).long()
        return L.cross_entropy_loss(self.head(p.encoder.pool(p.hidden)), target)


SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_regions=8,
             region_feat_dim=16, num_object_classes=7, max_position_embeddings=32,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, "caplen", CaptionLength)  # the "one registry line"


def test_new_objective_is_one_class_and_a_registry_line(registered):
    cfg = PretrainingConfig.from_dict({**SMALL, "objectives": {"mlm": 1.0, "caplen": {"weight": 0.5, "buckets": 4}}})
    assert cfg.objectives["caplen"].buckets == 4
    torch.manual_seed(0)
    m = ImageBERTForPretraining(cfg)
    assert m.objectives["caplen"].head.out_features == 4
    b = contract_batch(cfg, 6, text_len=(4, 12), regions=3, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        out = m(**b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss/caplen"].item()
    assert out["loss/caplen"].item() < first  # it trains
    torch.testing.assert_close(out["loss"], out["loss/mlm"] + 0.5 * out["loss/caplen"])
    with pytest.raises(ConfigError, match=r"unknown key 'caplen\.bucket'"):
        PretrainingConfig.from_dict({**SMALL, "objectives": {"caplen": {"bucket": 4}}})


def test_unregistered_objective_is_refused():
    with pytest.raises(ConfigError, match="unknown objective 'caplen'"):
        PretrainingConfig.from_dict({**SMALL, "objectives": {"caplen": 1.0}})


def test_input_keys_and_flops_follow_the_objectives():
    b = contract_batch(PretrainingConfig.from_dict(SMALL), 4, text_len=6, regions=3,
                       generator=torch.Generator().manual_seed(0))
    mlm_only = ImageBERTForPretraining(PretrainingConfig.from_dict({**SMALL, "objectives": {"mlm": 1.0}}))
    full = ImageBERTForPretraining(PretrainingConfig.from_dict(
        {**SMALL, "objectives": {"mlm": 1.0, "moc": {"variant": "kl"}, "itm": 1.0, "itc": {"embed_dim": 8}}}))
    assert "moc_probs" in full.input_keys() and "moc_probs" not in mlm_only.input_keys()
    assert "moc_labels" not in full.input_keys()  # the kl variant reads the distribution
    # ITC's two extra passes and the same MLM decoder: more FLOPs than the MLM-only model
    assert float(full.training_flops(b)) > float(mlm_only.training_flops(b)) > 0
