"""attn_impl='triton' + fused_ops (add+LayerNorm, MLM loss) through the model equal the torch path (Triton interpreter on
the CPU; a subprocess because TRITON_INTERPRET must be set before triton builds the kernels)."""
import json
import os
import subprocess
import sys

import pytest

from imagebert_ds.kernels import HAS_TRITON

SCRIPT = r"""
import json, torch
from imagebert_ds.model import PretrainingConfig, ImageBERTForPretraining
from imagebert_ds.model.backends import kernels_launchable
from imagebert_ds.testing import contract_batch
assert kernels_launchable(torch.zeros(1)), "interpreter not active"
base = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
    max_regions=8, region_feat_dim=16, num_object_classes=7, max_position_embeddings=32,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    objectives={"mlm": 1.0, "moc": 1.0, "mrfr": 1.0, "itm": 1.0, "itc": {"embed_dim": 8}})
torch.manual_seed(0)
mk = ImageBERTForPretraining(PretrainingConfig.from_dict({**base, "attn_impl": "triton", "fused_ops": True}))
mt = ImageBERTForPretraining(PretrainingConfig.from_dict({**base, "attn_impl": "sdpa"}))
mt.load_state_dict(mk.state_dict())
from imagebert_ds.kernels.modules import FusedAddLayerNorm, FusedMLMLoss, TritonAttention
calls = {c.__name__: 0 for c in (TritonAttention, FusedAddLayerNorm, FusedMLMLoss)}
for mod in mk.modules():  # the model's kernel Modules, each seen running
    if type(mod).__name__ in calls:
        mod.register_forward_hook(lambda m, *a: calls.__setitem__(type(m).__name__, calls[type(m).__name__] + 1))
b = contract_batch(mk.config, 3, text_len=5, regions=3, generator=torch.Generator().manual_seed(0))
res = {}
for name, m in (("kernels", mk), ("torch", mt)):
    m.train()
    o = m(**b)
    o["loss"].backward()
    res[name] = ({k: v.item() for k, v in o.items() if k.startswith("loss")},
                 {n: p.grad.clone() for n, p in m.named_parameters()})
(lk, gk), (lt, gt) = res["kernels"], res["torch"]
assert lk.keys() == lt.keys() and len(lk) == 6, lk
assert all(calls.values()), f"a kernel Module of the model did not run: {calls}"
assert mk.backend().startswith("triton (unpadded varlen)"), mk.backend()
print(json.dumps({
    "fwd": max(abs(lk[k] - lt[k]) for k in lk),
    # relative to the largest gradient: some are ~0 in exact arithmetic (the key bias: softmax
    # ignores a per-query constant), so a per-tensor relative error would be noise / noise
    "grad_rel": max((gk[n] - gt[n]).abs().max().item() for n in gt)
                / max(g.abs().max().item() for g in gt.values()),
}))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_and_fused_paths_match_torch():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    # fp32 everywhere; kernels accumulate in fp32 with a different order than torch
    assert d["fwd"] < 1e-4, d
    assert d["grad_rel"] < 1e-5, d
