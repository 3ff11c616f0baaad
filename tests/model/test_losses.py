"""ImageBERTForPretraining losses: hand-computed values, what they ignore, gradients, skipping."""
import pytest
import torch
import torch.nn.functional as F

from imagebert_ds.model import MODEL_INPUT_KEYS, PretrainingConfig, ImageBERTForPretraining
from imagebert_ds.testing import contract_batch

ALL_ON = {"mlm": {"weight": 1.0}, "moc": {"weight": 0.5}, "mrfr": {"weight": 2.0},
          "itm": {"weight": 1.5}, "itc": {"weight": 0.7, "embed_dim": 8}}


def small_config(variant="ce", **kw) -> PretrainingConfig:
    obj = {k: dict(v) for k, v in ALL_ON.items()}
    obj["moc"]["variant"] = variant
    base = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_regions=8,
                region_feat_dim=16, num_object_classes=7, max_position_embeddings=32,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, objectives=obj)
    base.update(kw)
    return PretrainingConfig.from_dict(base)


def make(variant="ce", seed=0, B=6):
    torch.manual_seed(seed)
    cfg = small_config(variant)
    model = ImageBERTForPretraining(cfg).train()
    batch = contract_batch(cfg, B, text_len=8, regions=5, generator=torch.Generator().manual_seed(seed))
    return model, batch


def test_forward_keys_match_contract():
    model, batch = make()
    assert set(batch) <= set(MODEL_INPUT_KEYS) and set(model.input_keys()) <= set(MODEL_INPUT_KEYS)
    with pytest.raises(TypeError, match="unexpected batch keys"):
        model(**batch, caption_ids=torch.arange(6))
    out = model(**batch)
    assert {"loss", "loss/mlm", "loss/moc", "loss/mrfr", "loss/itm", "loss/itc"} <= set(out)
    assert out["skipped"] == ()


@pytest.mark.parametrize("variant", ["ce", "kl"])
def test_losses_match_hand_computation(variant):
    model, b = make(variant)
    out = model(**b, return_logits=True)
    matched = b["itm_labels"] == 1
    # MLM: CE over masked tokens of matched rows
    sel = (b["mlm_labels"] != -100) & matched[:, None]
    exp_mlm = F.cross_entropy(out["mlm_logits"][sel], b["mlm_labels"][sel])
    # MOC / MRFR: masked, real regions of matched rows
    rsel = b["region_masked"] & b["region_mask"].bool() & matched[:, None]
    assert rsel.sum() >= 2
    if variant == "ce":
        exp_moc = F.cross_entropy(out["moc_logits"][rsel], b["moc_labels"][rsel])
    else:
        p, logq = b["moc_probs"][rsel], out["moc_logits"][rsel].log_softmax(-1)
        exp_moc = (p * (p.log() - logq)).sum(-1).mean()
    exp_mrfr = ((out["mrfr_pred"][rsel] - b["region_feats"][rsel]) ** 2).mean()
    exp_itm = F.cross_entropy(out["itm_logits"], b["itm_labels"])
    # ITC: independent passes on the original (unmasked) inputs of matched rows
    ids = b["input_ids"].clone()
    ids[b["mlm_labels"] != -100] = b["mlm_labels"][b["mlm_labels"] != -100]
    feats = b["region_feats"]  # the batch carries the original features only
    m = matched
    ht = model.bert(ids[m], b["attention_mask"][m])[:, 0]
    cls = torch.full((int(m.sum()), 1), model.config.cls_token_id)
    hi = model.bert(cls, torch.ones_like(cls), None, feats[m], b["region_boxes"][m], b["region_mask"][m])[:, 0]
    t = F.normalize(model.objectives["itc"].head.text_proj(ht), dim=-1)
    i = F.normalize(model.objectives["itc"].head.image_proj(hi), dim=-1)
    logits = i @ t.T / 0.07
    tgt = torch.arange(len(logits))
    exp_itc = (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt)) / 2

    exp = {"mlm": exp_mlm, "moc": exp_moc, "mrfr": exp_mrfr, "itm": exp_itm, "itc": exp_itc}
    for k, v in exp.items():
        torch.testing.assert_close(out[f"loss/{k}"], v, rtol=1e-5, atol=1e-5, msg=k)
    w = model.config.objectives
    total = sum(w[k].weight * v for k, v in exp.items())
    torch.testing.assert_close(out["loss"], total, rtol=1e-5, atol=1e-5)


def test_masked_losses_ignore_unmasked_and_mismatched():
    model, b = make("ce")
    model.eval()
    keys = ("loss/mlm", "loss/moc", "loss/mrfr")
    with torch.no_grad():
        ref = model(**b)
        mism = b["itm_labels"] == 0
        unmasked = ~b["region_masked"]
        pert = dict(b)
        # labels of mismatched rows: make every token of those rows an MLM target with a new label
        pert["mlm_labels"] = torch.where(mism[:, None], torch.full_like(b["mlm_labels"], 5), b["mlm_labels"])
        # region targets at unmasked regions, at padded regions and on mismatched rows
        reg = unmasked | mism[:, None] | ~b["region_mask"].bool()
        pert["moc_labels"] = torch.where(reg, torch.full_like(b["moc_labels"], 3), b["moc_labels"])
        # features (= MRFR targets) of masked regions on mismatched rows and of padded regions:
        # the joint pass reads zeros / ignores padding there, MRFR skips them
        hidden_reg = (b["region_masked"] & mism[:, None]) | ~b["region_mask"].bool()
        pert["region_feats"] = b["region_feats"] + 3.0 * hidden_reg[..., None]
        pert["region_masked"] = b["region_masked"] | (mism[:, None] & b["region_mask"].bool())
        out = model(**pert)
        for k in keys:
            assert torch.equal(out[k], ref[k]), k
        # positive control: the same changes on masked regions / tokens of matched rows do count
        ctrl = dict(b)
        ctrl["mlm_labels"] = torch.where(b["mlm_labels"] != -100, 5, -100)
        ctrl["moc_labels"] = torch.where(b["moc_labels"] != -100, 3, -100)
        ctrl["region_feats"] = b["region_feats"] + 3.0 * b["region_masked"][..., None]
        out = model(**ctrl)
        for k in keys:
            assert not torch.allclose(out[k], ref[k]), k


def test_masked_region_features_never_reach_the_joint_pass():
    """The model zeroes ``region_masked`` features before the encoder (the batch carries the
    originals, the MRFR targets): whatever they hold, MLM/MOC/ITM are unchanged, MRFR is not."""
    model, b = make("ce")
    model.eval()
    with torch.no_grad():
        ref = model(**b)
        alt = dict(b, region_feats=b["region_feats"].masked_fill(b["region_masked"][..., None], 7.0))
        out = model(**alt)
        zeroed = model.bert(b["input_ids"], b["attention_mask"], None,
                            b["region_feats"].masked_fill(b["region_masked"][..., None], 0.0),
                            b["region_boxes"], b["region_mask"])
        seen = model(**b, return_logits=True)
    for k in ("loss/mlm", "loss/moc", "loss/itm"):
        assert torch.equal(out[k], ref[k]), k
    assert not torch.allclose(out["loss/mrfr"], ref["loss/mrfr"])
    itm = model.objectives["itm"]
    torch.testing.assert_close(seen["itm_logits"], itm.logits(model.bert, zeroed))


@pytest.mark.parametrize("variant", ["ce", "kl"])
def test_every_parameter_gets_a_gradient(variant):
    model, b = make(variant)
    model(**b)["loss"].backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{n} got an all-zero gradient"


def test_no_valid_targets_gives_connected_zero():
    model, b = make("ce")
    b["itm_labels"] = torch.zeros_like(b["itm_labels"])  # every pair mismatched
    out = model(**b)
    for k in ("mlm", "moc", "mrfr", "itc"):
        assert out[f"loss/{k}"].item() == 0.0 and out[f"loss/{k}"].requires_grad, k
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert torch.isfinite(out["loss"])


def test_absent_inputs_are_skipped_and_reported():
    model, b = make("ce")
    text = {k: b[k] for k in ("input_ids", "attention_mask", "mlm_labels", "itm_labels")}
    out = model(**text)
    assert set(out["skipped"]) == {"moc", "mrfr", "itc"}
    assert "loss/moc" not in out and "loss/mlm" in out
    out["loss"].backward()
    for name in ("moc", "mrfr", "itc"):  # still in the graph
        assert all(p.grad is not None for p in model.objectives[name].parameters()), name
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert set(out["skipped"]) == {"mlm", "moc", "mrfr", "itm", "itc"} and out["loss"].item() == 0.0


def test_objectives_left_out_have_no_head():
    torch.manual_seed(0)
    cfg = small_config(objectives={"mlm": 1.0, "moc": 1.0, "itm": 1.0, "itc": 0.0})
    m = ImageBERTForPretraining(cfg)
    assert set(m.objectives) == {"mlm", "moc", "itm"}  # weight 0 switches itc off
    assert not any(n.startswith(("objectives.itc", "objectives.mrfr")) for n, _ in m.named_parameters())
    b = contract_batch(cfg, 4, text_len=6, regions=4, generator=torch.Generator().manual_seed(0))
    out = m(**b)
    assert "loss/itc" not in out and "loss/mrfr" not in out and "loss/moc" in out


def test_itm_scores():
    model, b = make("ce")
    model.eval()
    # itm_scores is inference (no masking): hand it what the training pass sees
    seen = b["region_feats"].masked_fill(b["region_masked"][..., None], 0.0)
    args = (b["input_ids"], b["attention_mask"], seen, b["region_boxes"], b["region_mask"])
    with torch.no_grad():
        p = model.itm_scores(*args)
        lo = model.itm_scores(*args, as_prob=False)
        logits = model(**b, return_logits=True)["itm_logits"]
    assert p.shape == (6,) and ((p > 0) & (p < 1)).all()
    torch.testing.assert_close(p, logits.softmax(-1)[:, 1])
    torch.testing.assert_close(torch.sigmoid(lo), p)


def test_masked_regions_do_not_explode_gradients():
    """Zeroed (masked) region features must not reach the region LayerNorm as a constant vector:
    with a zero projection bias its variance is 0 and the gradient is scaled by 1/sqrt(1e-12)."""
    model, b = make("ce")
    assert b["region_masked"].any()
    model(**b)["loss"].backward()
    worst = max(p.grad.abs().max().item() for p in model.parameters())
    assert worst < 100, worst
