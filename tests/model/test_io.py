"""save_pretrained / from_pretrained round trip (tied MLM decoder), and the smoke CLI."""
import torch

from imagebert_ds.model import PretrainingConfig, ImageBERTForPretraining, ImageBERTModel
from imagebert_ds.testing import contract_batch


def small_config() -> PretrainingConfig:
    return PretrainingConfig.from_dict(dict(
        hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_regions=8,
        region_feat_dim=16, num_object_classes=7, max_position_embeddings=32,
        objectives={"mlm": 1.0, "moc": {"variant": "kl"}, "mrfr": 1.0, "itm": 1.0, "itc": {"embed_dim": 8}}))


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = small_config()
    m = ImageBERTForPretraining(cfg)
    with torch.no_grad():  # make the state differ from a fresh init
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.yaml", "model.safetensors"]
    m2 = ImageBERTForPretraining.from_pretrained(tmp_path / "ckpt")
    assert m2.config == cfg
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    assert m2.objectives["mlm"].head.decoder.weight is m2.bert.embeddings.word_embeddings.weight  # still tied
    b = contract_batch(cfg, 4, text_len=6, regions=4, generator=torch.Generator().manual_seed(0))
    m.eval(), m2.eval()
    with torch.no_grad():
        o, o2 = m(**b, return_logits=True), m2(**b, return_logits=True)
    for k in ("loss", "mlm_logits", "moc_logits", "itm_logits", "itc_logits"):
        assert torch.equal(o[k], o2[k]), k


def test_encoder_round_trip(tmp_path):
    torch.manual_seed(0)
    m = ImageBERTModel(small_config())
    m.save_pretrained(tmp_path)
    m2 = ImageBERTModel.from_pretrained(tmp_path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_smoke_cli(capsys):
    from imagebert_ds.cli import main
    assert main(["smoke", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "step   0" in out and "step  19" in out and "OK" in out
    for t in ("mlm", "moc", "mrfr", "itm", "itc"):
        assert f"{t}=" in out


def test_smoke_cli_can_fail(capsys):
    """With lr=0 nothing can decrease: the command must exit non-zero."""
    from imagebert_ds.cli import main
    assert main(["smoke", "--steps", "3", "--lr", "0", "--set", "hidden_dropout_prob=0.0",
                 "--set", "attention_probs_dropout_prob=0.0"]) == 1
    assert "did not decrease" in capsys.readouterr().out


def test_loads_what_release_0_1_0_saved():
    """``tests/assets/saved_0.1.0``: a tiny pre-training model and its encoder saved by release
    0.1.0 (objectives inside the model config) load, weights bit for bit."""
    from pathlib import Path

    import torch

    assets = Path(__file__).resolve().parents[1] / "assets" / "saved_0.1.0"
    m = ImageBERTForPretraining.from_pretrained(assets / "pretraining")
    assert list(m.objectives) == ["mlm", "moc", "mrfr", "itm", "itc"]
    assert m.config.objectives["itc"].embed_dim == 8
    total = float(sum(p.detach().double().sum() for p in m.parameters()))
    assert total == 129.80498168245094
    enc = ImageBERTModel.from_pretrained(assets / "encoder")
    assert not hasattr(enc.config, "objectives")
    for (k, a), (_, b) in zip(sorted(enc.state_dict().items()), sorted(m.bert.state_dict().items())):
        assert torch.equal(a, b), k
