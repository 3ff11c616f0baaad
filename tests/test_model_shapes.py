"""ImageBERTModel: output shapes, padding masks (text and regions), eager == sdpa, checkpointing."""
import logging

import pytest
import torch

from imagebert_ds.model import ImageBERTConfig, ImageBERTModel, ImageBERTForPretraining
from imagebert_ds.model.cli import random_batch


def small_config(**kw) -> ImageBERTConfig:
    base = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_regions=8,
                region_feat_dim=16, num_object_classes=7, max_position_embeddings=32,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return ImageBERTConfig.from_dict(base)


def model_inputs(batch):
    keys = ("input_ids", "attention_mask", "token_type_ids", "region_feats", "region_boxes", "region_mask")
    return {k: batch[k] for k in keys}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ImageBERTModel(small_config()).eval()


def test_shapes(model):
    b = random_batch(model.config, 3, text_len=7, regions=5, generator=torch.Generator().manual_seed(0))
    h = model(**model_inputs(b))
    assert h.shape == (3, 7 + 5, 32)
    assert model(b["input_ids"], b["attention_mask"]).shape == (3, 7, 32)  # text only: L = Lt
    # batch of 1, 1-token text, 1 region
    h = model(torch.tensor([[101]]), torch.tensor([[1]]), None, torch.randn(1, 1, 16), torch.rand(1, 1, 5),
              torch.tensor([[1]]))
    assert h.shape == (1, 2, 32) and torch.isfinite(h).all()
    with pytest.raises(ValueError, match="exceed max_regions"):
        model(b["input_ids"], b["attention_mask"], None, torch.randn(3, 9, 16), torch.rand(3, 9, 5))


def test_fully_padded_regions_equal_text_only(model):
    """A row whose region set is all padding must give exactly the text-only outputs."""
    b = random_batch(model.config, 2, text_len=6, regions=4, generator=torch.Generator().manual_seed(1))
    inp = model_inputs(b)
    inp["region_mask"] = torch.zeros(2, 4, dtype=torch.long)
    with torch.no_grad():
        h = model(**inp)
        h_text = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    torch.testing.assert_close(h[:, :6], h_text, rtol=0, atol=1e-6)
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padding_is_ignored(model, impl):
    """Changing padded text tokens or padded region features changes no real position's output;
    changing a real region does (so the check can fail)."""
    model.set_attn_impl(impl)
    b = random_batch(model.config, 4, text_len=8, regions=6, generator=torch.Generator().manual_seed(2))
    inp = model_inputs(b)
    real = torch.cat([inp["attention_mask"], inp["region_mask"]], 1).bool()
    assert (~real).any()
    with torch.no_grad():
        h = model(**inp)
        pert = dict(inp)
        pert["input_ids"] = torch.where(inp["attention_mask"].bool(), inp["input_ids"], 7)
        pad_r = ~inp["region_mask"].bool()
        pert["region_feats"] = inp["region_feats"] + 5.0 * pad_r[..., None]
        pert["region_boxes"] = inp["region_boxes"] + pad_r[..., None]
        h2 = model(**pert)
        torch.testing.assert_close(h2[real], h[real], rtol=0, atol=1e-5)
        pert["region_feats"] = inp["region_feats"] + 5.0  # real regions too
        h3 = model(**pert)
    assert (h3[real] - h[real]).abs().max() > 1e-2


def test_eager_matches_sdpa(model):
    b = random_batch(model.config, 4, text_len=9, regions=7, generator=torch.Generator().manual_seed(3))
    inp = model_inputs(b)
    real = torch.cat([inp["attention_mask"], inp["region_mask"]], 1).bool()
    with torch.no_grad():
        model.set_attn_impl("eager")
        he = model(**inp)
        model.set_attn_impl("sdpa")
        hs = model(**inp)
    # fp32, different reduction orders only
    torch.testing.assert_close(hs[real], he[real], rtol=0, atol=1e-5)


def test_triton_falls_back_with_notice(caplog):
    from imagebert_ds.kernels import triton_available
    if triton_available():
        pytest.skip("Triton can run here; the fallback path is not taken")
    torch.manual_seed(0)
    cfg = small_config(attn_impl="triton")
    m = ImageBERTModel(cfg).eval()
    b = random_batch(cfg, 2, text_len=5, regions=3, generator=torch.Generator().manual_seed(0))
    from imagebert_ds.model import attention
    attention._NOTICES.clear()
    with caplog.at_level(logging.WARNING, logger="imagebert_ds.model.attention"), torch.no_grad():
        ht = m(**model_inputs(b))
        m(**model_inputs(b))
        m.set_attn_impl("sdpa")
        hs = m(**model_inputs(b))
    assert sum("attn_impl='triton'" in r.message for r in caplog.records) == 1  # once
    torch.testing.assert_close(ht, hs, rtol=0, atol=0)


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    cfg = small_config()
    m = ImageBERTForPretraining(cfg).train()
    b = random_batch(cfg, 4, text_len=6, regions=4, generator=torch.Generator().manual_seed(4))
    m(**b)["loss"].backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.gradient_checkpointing_enable()
    assert m.bert.encoder.gradient_checkpointing
    m(**b)["loss"].backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_fused_ops_falls_back_with_notice(caplog):
    from imagebert_ds.model import attention
    from imagebert_ds.model.attention import kernels_usable_on
    if kernels_usable_on(torch.zeros(1)):
        pytest.skip("Triton can run on CPU tensors here (interpreter); the fallback is not taken")
    torch.manual_seed(0)
    m = ImageBERTModel(small_config(fused_ops=True)).eval()
    b = random_batch(m.config, 2, text_len=5, regions=3, generator=torch.Generator().manual_seed(0))
    attention._NOTICES.clear()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        hf = m(**model_inputs(b))
        for layer in m.encoder.layer:
            layer.fused = None
        h = m(**model_inputs(b))
    assert sum("fused_ops=True" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(hf, h, rtol=0, atol=0)
