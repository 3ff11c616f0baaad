"""attn_impl='triton' runs the encoder unpadded: text + region tokens are packed once with
``cu_seqlens`` and every layer uses ``attention_varlen``; real-token outputs and all gradients equal
the padded sdpa path (Triton interpreter on the CPU, in a subprocess because TRITON_INTERPRET must
be set before triton builds the kernels)."""
import json
import os
import subprocess
import sys

import pytest

from imagebert_ds.kernels import HAS_TRITON

PREAMBLE = r"""
import json, torch
import imagebert_ds.kernels.modules as K  # the namespace the model's TritonAttention calls from
from imagebert_ds.model import PretrainingConfig, ImageBERTForPretraining
from imagebert_ds.testing import contract_batch
calls = {"varlen": 0, "padded": 0}
_v, _p = K.attention_varlen, K.attention
K.attention_varlen = lambda *a, **k: calls.__setitem__("varlen", calls["varlen"] + 1) or _v(*a, **k)
K.attention = lambda *a, **k: calls.__setitem__("padded", calls["padded"] + 1) or _p(*a, **k)
"""  # counts the calls of the packed and the padded kernel

SCRIPT = PREAMBLE + r"""
cfg = PretrainingConfig.from_dict(dict(vocab_size=1100, hidden_size=32, num_layers=2, num_heads=2,
    intermediate_size=64, max_regions=8, region_feat_dim=16, num_object_classes=7,
    max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    attn_impl="triton", objectives={"mlm": 1.0, "moc": 1.0, "mrfr": 1.0, "itm": 1.0, "itc": {"embed_dim": 8}}))
torch.manual_seed(0)
m = ImageBERTForPretraining(cfg).train()
b = contract_batch(cfg, 4, text_len=7, regions=5, generator=torch.Generator().manual_seed(1))
b["region_mask"][1, 2:] = 0          # ragged regions: 5, 2, 5, 5 real
b["region_mask"][3, :] = 0           # and one image with none
res = {}
for impl in ("triton", "sdpa"):
    m.bert.set_attn_impl(impl)
    m.zero_grad()
    h = m.bert(b["input_ids"], b["attention_mask"], None, b["region_feats"], b["region_boxes"],
               b["region_mask"])
    keep = torch.cat([b["attention_mask"], b["region_mask"]], 1).bool()
    out = m(**b)
    out["loss"].backward()
    res[impl] = (h[keep].detach(), out["loss"].item(),
                 {n: p.grad.clone() for n, p in m.named_parameters()})
(hv, lv, gv), (hs, ls, gs) = res["triton"], res["sdpa"]
print(json.dumps({"calls": calls, "fwd": (hv - hs).abs().max().item(), "loss": abs(lv - ls),
                  "grad_rel": max((gv[n] - gs[n]).abs().max().item() for n in gs)
                              / max(g.abs().max().item() for g in gs.values())}))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_unpadded_triton_path_matches_padded_sdpa():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    # the packed path really ran (2 layers x (main + ITC text + ITC image passes), twice: the
    # hidden-state probe and the loss), and the padded kernel never did
    assert d["calls"]["varlen"] >= 2 * 2 and d["calls"]["padded"] == 0, d
    # fp32 both ways; the kernel accumulates in another order than sdpa
    assert d["fwd"] < 1e-5 and d["loss"] < 1e-5 and d["grad_rel"] < 1e-5, d


PIXEL_SCRIPT = PREAMBLE + r"""
cfg = PretrainingConfig.from_dict(dict(vocab_size=1100, hidden_size=32, num_layers=2, num_heads=2,
    intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, attn_impl="triton",
    visual={"mode": "pixel", "backbone": "resnet18", "backbone_stages": 1, "sample_pixels": 6,
            "max_grid": 8},
    objectives={"mlm": 1.0, "itm": 1.0, "itc": {"embed_dim": 8}}))
torch.manual_seed(0)
m = ImageBERTForPretraining(cfg).train()
b = contract_batch(cfg, 3, text_len=(4, 7), regions=2, generator=torch.Generator().manual_seed(1))
b = {k: v for k, v in b.items() if not k.startswith(("region", "moc"))}
b["pixel_values"] = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
res = {}
for impl in ("triton", "sdpa"):
    m.bert.set_attn_impl(impl)
    m.zero_grad()
    torch.manual_seed(3)  # the same random pixel sample both ways
    out = m(**b)
    out["loss"].backward()
    res[impl] = (out["loss"].item(), {n: p.grad.clone() for n, p in m.named_parameters()
                                      if p.grad is not None})
(lv, gv), (ls, gs) = res["triton"], res["sdpa"]
print(json.dumps({"calls": calls, "loss": abs(lv - ls), "n_grads": len(gs),
                  "grad_rel": max((gv[n] - gs[n]).abs().max().item() for n in gs)
                              / max(g.abs().max().item() for g in gs.values())}))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_unpadded_triton_path_with_pixel_tokens_matches_sdpa():
    """Pixel-BERT's sampled visual tokens go through the packed Triton path like regions do."""
    pytest.importorskip("torchvision")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", PIXEL_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["calls"]["varlen"] >= 2 and d["calls"]["padded"] == 0, d
    assert d["loss"] < 1e-5 and d["grad_rel"] < 1e-5, d
