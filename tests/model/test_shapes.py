"""ImageBERTModel: output shapes, padding masks (text and regions), eager == sdpa, checkpointing."""
import os
import subprocess
import sys

import pytest
import torch

from imagebert_ds.model import PretrainingConfig, ImageBERTModel, ImageBERTForPretraining
from imagebert_ds.testing import contract_batch


def small_config(**kw) -> PretrainingConfig:
    base = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_regions=8,
                region_feat_dim=16, num_object_classes=7, max_position_embeddings=32,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return PretrainingConfig.from_dict(base)


def model_inputs(batch):
    keys = ("input_ids", "attention_mask", "token_type_ids", "region_feats", "region_boxes", "region_mask")
    return {k: batch[k] for k in keys}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ImageBERTModel(small_config()).eval()


def test_shapes(model):
    b = contract_batch(model.config, 3, text_len=7, regions=5, generator=torch.Generator().manual_seed(0))
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
    b = contract_batch(model.config, 2, text_len=6, regions=4, generator=torch.Generator().manual_seed(1))
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
    b = contract_batch(model.config, 4, text_len=8, regions=6, generator=torch.Generator().manual_seed(2))
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
    b = contract_batch(model.config, 4, text_len=9, regions=7, generator=torch.Generator().manual_seed(3))
    inp = model_inputs(b)
    real = torch.cat([inp["attention_mask"], inp["region_mask"]], 1).bool()
    with torch.no_grad():
        model.set_attn_impl("eager")
        he = model(**inp)
        model.set_attn_impl("sdpa")
        hs = model(**inp)
    # fp32, different reduction orders only
    torch.testing.assert_close(hs[real], he[real], rtol=0, atol=1e-5)


def test_unavailable_backend_is_an_error_not_a_fallback():
    """Without CUDA and without TRITON_INTERPRET the kernels cannot run: asking for them is an
    error naming the config key when the model is built (a fresh process: conftest sets the
    interpreter for this one)."""
    script = (
        "from imagebert_ds.model import PretrainingConfig, ImageBERTModel\n"
        "for kw in ({'attn_impl': 'triton'}, {'fused_ops': True}):\n"
        "    try:\n"
        "        ImageBERTModel(PretrainingConfig(hidden_size=32, num_heads=2, intermediate_size=64, **kw))\n"
        "    except ValueError as e:\n"
        "        print('ERR', e)\n"
        "    else:\n"
        "        print('BUILT', kw)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(ln.startswith("ERR") for ln in lines), lines
    assert "attn_impl 'triton' needs the Triton kernels" in lines[0]
    assert "fused_ops needs the Triton kernels" in lines[1]


def test_kernels_on_a_device_they_cannot_run_on_raise():
    """A model built where Triton runs, fed tensors on a device it cannot launch on, raises
    instead of silently switching to sdpa."""
    from imagebert_ds.model.backends import check_launchable, kernels_launchable
    if not kernels_launchable(torch.zeros(1)):
        pytest.skip("Triton cannot run on CPU tensors in this process")
    with pytest.raises(RuntimeError, match="attn_impl 'triton': the Triton kernels cannot run on meta"):
        check_launchable(torch.zeros(1, device="meta"), "attn_impl 'triton'")


def test_unsupported_head_dim_is_a_config_error():
    with pytest.raises(ValueError, match=r"attn_impl 'triton' cannot run this model.*head dim"):
        PretrainingConfig(hidden_size=40, num_heads=4, intermediate_size=64, attn_impl="triton")


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    cfg = small_config()
    m = ImageBERTForPretraining(cfg).train()
    b = contract_batch(cfg, 4, text_len=6, regions=4, generator=torch.Generator().manual_seed(4))
    m(**b)["loss"].backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.gradient_checkpointing_enable()
    assert m.bert.encoder.gradient_checkpointing
    m(**b)["loss"].backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)
