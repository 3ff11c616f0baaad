"""Pixel-BERT / patch input: visual tokens, random pixel sampling, config refusals, the backbone's
weights file, and its LR schedule (multiplier, frozen steps)."""
import pytest
import torch

pytest.importorskip("torchvision")

from imagebert_ds.config_utils import ConfigError  # noqa: E402
from imagebert_ds.model import PretrainingConfig, ImageBERTForPretraining  # noqa: E402
from imagebert_ds.testing import contract_batch  # noqa: E402
from imagebert_ds.train.optim import param_groups, warmup_linear_decay  # noqa: E402


def config(mode="pixel", **visual) -> PretrainingConfig:
    v = {"mode": mode, "backbone": "resnet18", "backbone_stages": 2, "sample_pixels": 10,
         "patch_size": 8, "max_grid": 16, **visual}
    return PretrainingConfig.from_dict(dict(
        hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        visual=v, objectives={"mlm": 1.0, "itm": 1.0, "itc": {"embed_dim": 8}}))


def batch(cfg, B=4, size=64):
    b = contract_batch(cfg, B, text_len=(4, 8), regions=2, generator=torch.Generator().manual_seed(0))
    b = {k: v for k, v in b.items() if not k.startswith(("region", "moc"))}
    b["pixel_values"] = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(1))
    return b


@pytest.mark.parametrize("mode", ["pixel", "patch"])
def test_visual_tokens_sampled_in_training_all_in_eval(mode):
    cfg = config(mode)
    torch.manual_seed(0)
    model = ImageBERTForPretraining(cfg)
    b = batch(cfg)
    Lt = b["input_ids"].shape[1]
    assert "pixel_values" in model.input_keys() and "region_feats" not in model.input_keys()
    enc = model.bert
    model.train()
    h = enc(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"])
    assert h.shape == (4, Lt + 10, 32)  # 10 of the 8 x 8 = 64 positions
    model.eval()
    h = enc(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"])
    assert h.shape == (4, Lt + 64, 32)
    # FLOPs count the sampled tokens in training
    model.train()
    f_train = float(model.training_flops(b))
    model.eval()
    assert float(model.training_flops(b)) > f_train


def test_pixel_sampling_fresh_each_step_reproducible_from_the_seed():
    cfg = config()
    torch.manual_seed(0)
    v = ImageBERTForPretraining(cfg).bert.embeddings.visual.train()
    v.backbone.eval()  # BatchNorm with running stats: the same features in both modes
    x, seg = torch.randn(2, 3, 64, 64), torch.zeros(32)
    torch.manual_seed(5)
    (a, real), (b, _) = v(x, seg), v(x, seg)
    assert real.shape == (2, 10) and real.all()  # no padding: every token is attended to
    torch.manual_seed(5)
    assert torch.equal(v(x, seg)[0], a)        # the same draw from the same RNG state
    assert not torch.equal(a, b)               # a fresh subset at the next step
    full = v.eval()(x, seg)[0]                 # (2, 64, H): every sampled token is one of them
    match = (a[:, :, None, :] - full[:, None, :, :]).abs().amax(-1) < 1e-6      # (2, 10, 64)
    assert match.any(-1).all() and (match.sum(-1) == 1).all()
    assert len({int(i) for i in match[0].float().argmax(-1)}) == 10  # without replacement


def test_pixel_model_trains_and_scores():
    cfg = config()
    torch.manual_seed(0)
    model = ImageBERTForPretraining(cfg).train()
    b = batch(cfg)
    out = model(**b)
    assert {"loss/mlm", "loss/itm", "loss/itc"} <= set(out) and out["skipped"] == ()
    out["loss"].backward()
    assert model.bert.embeddings.visual.backbone[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        s = model.itm_scores(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"])
        e = model.embed_image(pixel_values=b["pixel_values"])
    assert s.shape == (4,) and e.shape == (4, 8)


def test_region_objectives_refused_in_pixel_mode():
    with pytest.raises(ConfigError, match="objectives.moc needs detector regions.*'pixel'"):
        PretrainingConfig.from_dict({"visual": {"mode": "pixel"}, "objectives": {"mlm": 1, "moc": 1}})
    with pytest.raises(ConfigError, match="objectives.mrfr needs detector regions.*'patch'"):
        PretrainingConfig.from_dict({"visual": {"mode": "patch"}, "objectives": {"mrfr": 1}})
    with pytest.raises(ConfigError, match="visual.backbone_stages must be 1..4"):
        PretrainingConfig.from_dict({"visual": {"mode": "pixel", "backbone_stages": 5}})


def test_backbone_weights_from_a_local_file(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    model = ImageBERTForPretraining(config(backbone_weights=str(tmp_path / "r18.pth")))
    assert torch.equal(model.bert.embeddings.visual.backbone[0].weight, ref.conv1.weight)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: not a torchvision resnet18 state_dict"):
        ImageBERTForPretraining(config(backbone_weights=str(tmp_path / "bad.pth")))
    with pytest.raises(ConfigError, match="is not a file"):
        config(backbone_weights=str(tmp_path / "missing.pth"))


def test_backbone_lr_multiplier_and_frozen_steps():
    model = ImageBERTForPretraining(config())
    groups = param_groups(model, 0.01)
    bb = [g for g in groups if g["backbone"]]
    assert bb and sum(len(g["params"]) for g in bb) == \
        len(list(model.bert.embeddings.visual.backbone.parameters()))
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = warmup_linear_decay(opt, 2, 10, 1e-3, backbone_lr_mult=0.1, freeze_backbone_steps=3)
    lrs = []
    for _ in range(5):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    main = [lr[0] for lr in lrs]
    back = [lr[[i for i, g in enumerate(opt.param_groups) if g["backbone"]][0]] for lr in lrs]
    assert back[:3] == [0.0, 0.0, 0.0]
    assert back[3] == pytest.approx(0.1 * main[3]) and back[4] == pytest.approx(0.1 * main[4])


def test_scorer_takes_images_for_a_pixel_model(tmp_path):
    """The scoring API of a pixel model: image files, bytes, PIL images and normalized arrays give
    the same scores; score_matrix agrees with score; embeddings are unit-norm."""
    import io

    import numpy as np
    from PIL import Image

    from imagebert_ds import Scorer
    from imagebert_ds.data import DataConfig, load_tokenizer
    from imagebert_ds.data.retrieval_split import decode_image

    cfg = config(sample_pixels=0)
    torch.manual_seed(0)
    model = ImageBERTForPretraining(cfg)
    data = DataConfig(image_size=32, max_text_len=16, use_regions=False, use_images=True)
    scorer = Scorer(model, load_tokenizer(data.tokenizer, data.max_text_len), data)
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(2)]
    blobs = []
    for i, p in enumerate(pics):
        buf = io.BytesIO()
        p.save(buf, format="PNG")
        blobs.append(buf.getvalue())
        (tmp_path / f"{i}.png").write_bytes(blobs[-1])
    caps = ["a red circle on the left", "a blue square"]
    by_bytes = scorer.score(blobs, caps)
    assert by_bytes.shape == (2,) and ((by_bytes > 0) & (by_bytes < 1)).all()
    torch.testing.assert_close(scorer.score([tmp_path / "0.png", tmp_path / "1.png"], caps), by_bytes)
    torch.testing.assert_close(scorer.score(pics, caps), by_bytes)
    arrays = np.stack([decode_image(b, 32, "k") for b in blobs])
    assert arrays.shape == (2, 3, 32, 32)
    torch.testing.assert_close(scorer.score(arrays, caps), by_bytes)
    m = scorer.score_matrix(blobs, caps)
    assert m.shape == (2, 2)
    torch.testing.assert_close(m.diagonal(), by_bytes, atol=1e-5, rtol=1e-5)
    e = scorer.embed_images(blobs)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        scorer.score([tmp_path / "nope.jpg"], caps[:1])


def test_cnn_runs_once_per_training_step():
    """The joint pass, the ITC image pass and ITM's hard negatives share one feature map, and
    tokens from it equal tokens from the pixels."""
    cfg = PretrainingConfig.from_dict({**config(sample_pixels=0).to_dict(), "objectives": {
        "mlm": 1.0, "itm": {"negatives": "hard", "num_negatives": 2}, "itc": {"embed_dim": 8}}})
    torch.manual_seed(0)
    model = ImageBERTForPretraining(cfg)
    b = batch(cfg)
    b["image_ids"] = torch.arange(4)
    calls = []
    model.bert.embeddings.visual.backbone.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    model(**b)["loss"].backward()
    assert len(calls) == 1
    model.eval()
    enc, px = model.bert, b["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(enc(b["input_ids"], b["attention_mask"], pixel_values=px),
                                   enc(b["input_ids"], b["attention_mask"],
                                       visual_features=enc.visual_features(px)))


def test_padding_cells_are_masked_and_sampled_last():
    """image_fit: pad leaves zeros bottom / right: a cell whose footprint is only padding gets
    attention mask 0 (and is never attended to), and sampling draws real cells first."""
    cfg = config(sample_pixels=20)
    torch.manual_seed(0)
    model = ImageBERTForPretraining(cfg)
    v, enc = model.bert.embeddings.visual, model.bert
    x = torch.randn(2, 3, 64, 64)
    x[0, :, 40:, :] = 0                        # image 0: rows 40.. padding (8 px cells: 5 real rows)
    x[1, :, :, 20:] = 0                        # image 1: columns 20.. padding (cells 0-2 real)
    model.eval()
    _, real = v(x, torch.zeros(32))
    grid = real.view(2, 8, 8)
    assert grid[0, :5].all() and not grid[0, 5:].any()
    assert grid[1, :, :3].all() and not grid[1, :, 3:].any()  # cell 2 (16-23 px) is partly real
    # masked cells do not change what the text sees: same output whatever the padding holds
    ids = torch.randint(1000, 2000, (2, 6))
    h = enc(ids, torch.ones_like(ids), pixel_values=x)[:, :6]
    torch.testing.assert_close(h, enc(ids, torch.ones_like(ids),
                                      visual_features=enc.visual_features(x))[:, :6])
    feats = enc.visual_features(x)
    feats.map[~feats.real] = 100.0             # garbage in the padded cells' features
    torch.testing.assert_close(enc(ids, torch.ones_like(ids), visual_features=feats)[:, :6], h)
    # sampling: image 0 has 40 real cells, image 1 24; 20 drawn, all real
    v.train()
    v.backbone.eval()
    _, real = v(x, torch.zeros(32))
    assert real.shape == (2, 20) and real.all()
    x[1, :, :, 8:] = 0                         # image 1: 8 real cells, so 12 of the 20 are padding
    _, real = v(x, torch.zeros(32))
    assert real.sum(1).tolist() == [20, 8]
