"""Retrieval fine-tuning losses of the ITM objective (binary / multi-class / triplet over mined
negatives) against direct formulas, and the negative choice itself."""
import pytest
import torch
import torch.nn.functional as F

from imagebert_ds.config_utils import ConfigError
from imagebert_ds.model import PretrainingConfig, ImageBERTForPretraining
from imagebert_ds.model.objectives import parse_objectives
from imagebert_ds.testing import contract_batch

IMAGE_IDS = torch.tensor([0, 0, 1, 2, 3])  # rows 0 and 1 show the same image


def make(loss="multiclass", negatives="random", n=2, margin=0.2):
    torch.manual_seed(0)
    obj = {"itm": {"weight": 1.0, "loss": loss, "negatives": negatives, "num_negatives": n,
                   "margin": margin}, "itc": {"weight": 1.0, "embed_dim": 8}}
    cfg = PretrainingConfig.from_dict(dict(
        hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_regions=8,
        region_feat_dim=16, num_object_classes=7, max_position_embeddings=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, objectives=obj))
    model = ImageBERTForPretraining(cfg).eval()
    b = contract_batch(cfg, 5, text_len=(4, 8), regions=5, generator=torch.Generator().manual_seed(1))
    batch = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids", "region_feats",
                               "region_boxes", "region_mask")}
    batch["image_ids"] = IMAGE_IDS.clone()
    return model, batch


def pair_logits(model, b, t, i):
    """(2,) ITM logits of caption row t with image row i, straight through the model."""
    h = model.bert(b["input_ids"][t:t + 1], b["attention_mask"][t:t + 1], None,
                   b["region_feats"][i:i + 1], b["region_boxes"][i:i + 1], b["region_mask"][i:i + 1])
    return model.objectives["itm"].logits(model.bert, h)[0].float()


def fixed_negatives(monkeypatch, model):
    """Negatives (row -> 2 others) chosen by hand; row 4's second one marked invalid."""
    neg = torch.tensor([[2, 3], [3, 4], [0, 4], [1, 2], [0, 1]])
    ok = torch.ones(5, 2, dtype=torch.bool)
    ok[4, 1] = False
    monkeypatch.setattr(model.objectives["itm"], "choose_negatives",
                        lambda p: (neg, ok, neg.flip(1), ok))
    return neg, ok


@pytest.mark.parametrize("loss", ["binary", "multiclass", "triplet"])
def test_finetune_loss_matches_direct_formula(monkeypatch, loss):
    model, b = make(loss, margin=5.0)  # a wide margin: the hinge is active
    neg, ok = fixed_negatives(monkeypatch, model)
    with torch.no_grad():
        got = model(**b)["loss/itm"]
        score = lambda lo: lo[1] - lo[0]
        terms, pos_ce, neg_ce = [], [], []
        for r in range(5):
            pos = pair_logits(model, b, r, r)
            pos_ce.append(F.cross_entropy(pos[None], torch.tensor([1])))
            for direction, cand in (("i2t", neg[r]), ("t2i", neg.flip(1)[r])):
                negs = [pair_logits(model, b, int(c), r) if direction == "i2t"
                        else pair_logits(model, b, r, int(c))
                        for c, valid in zip(cand, ok[r]) if valid]
                neg_ce += [F.cross_entropy(x[None], torch.tensor([0])) for x in negs]
                s = torch.stack([score(pos)] + [score(x) for x in negs])
                if loss == "multiclass":
                    terms.append(-s.log_softmax(0)[0])
                elif loss == "triplet":
                    terms.append((5.0 - s[0] + s[1:].max()).clamp(min=0))
        if loss == "binary":
            want = (sum(pos_ce) + sum(neg_ce)) / (len(pos_ce) + len(neg_ce))
        else:
            want = sum(terms) / len(terms)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("negatives", ["random", "hard"])
def test_negatives_never_show_the_anchor_image(negatives):
    model, b = make(negatives=negatives, n=3)
    p = model._encode(dict(b), False)
    neg_t, ok_t, neg_i, ok_i = model.objectives["itm"].choose_negatives(p)
    for neg, ok in ((neg_t, ok_t), (neg_i, ok_i)):
        assert neg.shape == (5, 3) and ok.all()  # 3 other images for every row
        assert (IMAGE_IDS[neg] != IMAGE_IDS[:, None]).all()
    if negatives == "hard":  # the most similar others by ITC, in order
        itc = model.objectives["itc"]
        with torch.no_grad():
            sim = itc.embed_image(model.bert, b["region_feats"], b["region_boxes"], b["region_mask"]) \
                @ itc.embed_text(model.bert, b["input_ids"], b["attention_mask"]).T
        sim[IMAGE_IDS[:, None] == IMAGE_IDS[None, :]] = float("-inf")
        assert torch.equal(neg_t, sim.topk(3, dim=1).indices)


def test_too_few_other_images_marks_negatives_invalid():
    model, b = make(n=4)
    b["image_ids"] = torch.tensor([0, 0, 0, 1, 1])  # two images: 2 or 3 valid negatives per row
    p = model._encode(dict(b), False)
    _, ok_t, _, _ = model.objectives["itm"].choose_negatives(p)
    assert ok_t.sum(1).tolist() == [2, 2, 2, 3, 3]
    out = model(**b)
    assert torch.isfinite(out["loss/itm"])


def test_finetune_options_are_checked():
    with pytest.raises(ConfigError, match="needs negatives chosen by the model"):
        parse_objectives({"itm": {"loss": "triplet"}})
    with pytest.raises(ConfigError, match="num_negatives must be >= 1"):
        parse_objectives({"itm": {"negatives": "random", "num_negatives": 0}})
    model, b = make(negatives="hard")
    del model.objectives["itc"]
    with pytest.raises(RuntimeError, match="add an itc objective"):
        model(**b)


def test_finetune_trains_every_head_and_the_itm_head_is_shared():
    """The fine-tuning losses train the same ITM head the pre-training ITM loss does (no new
    parameters: a pre-trained checkpoint loads into it unchanged)."""
    model, b = make("triplet", "hard")
    pre = ImageBERTForPretraining(PretrainingConfig.from_dict(
        {**model.config.to_dict(), "objectives": {"itm": 1.0, "itc": {"embed_dim": 8}}}))
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in pre.named_parameters()]
    model.train()
    model(**b)["loss"].backward()
    assert model.objectives["itm"].head.classifier.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", ["binary", "multiclass"])
def test_positives_scored_on_the_original_text_when_mlm_masked(loss):
    """With MLM in the batch the joint pass reads masked text, the negatives the original: the
    positives must be scored on the original text too, or ITM can tell them apart by [MASK]."""
    model, b = make(loss)
    with torch.no_grad():  # a head far from uniform, so that scores tell the inputs apart
        model.objectives["itm"].head.classifier.weight.mul_(100)
    masked = dict(b)
    labels = torch.full_like(b["input_ids"], -100)
    labels[:, 2] = b["input_ids"][:, 2]                      # one token of each caption masked
    masked["input_ids"] = b["input_ids"].clone()
    masked["input_ids"][:, 2] = model.config.mask_token_id
    masked["mlm_labels"] = labels
    clean = dict(b, mlm_labels=torch.full_like(labels, -100))  # nothing masked
    with torch.no_grad():
        torch.manual_seed(3)
        got = model(**masked)["loss/itm"]
        torch.manual_seed(3)
        want = model(**clean)["loss/itm"]
    torch.testing.assert_close(got, want)
    # the check can fail: scored on the joint pass, the masked positives give another loss
    with torch.no_grad():
        torch.manual_seed(3)
        joint = model(**{k: v for k, v in masked.items() if k != "mlm_labels"})["loss/itm"]
    assert not torch.allclose(joint, want)


@pytest.mark.parametrize("negatives", ["random", "hard"])
def test_exclude_same_caption_drops_duplicate_captions(negatives):
    model, b = make(negatives=negatives, n=4)
    b["input_ids"][3] = b["input_ids"][2]                    # rows 2 and 3: other images, same text
    b["attention_mask"][3] = b["attention_mask"][2]
    itm = model.objectives["itm"]
    p = model._encode(dict(b), False)
    neg_t, ok_t, _, _ = itm.choose_negatives(p)
    assert (neg_t[2][ok_t[2]] == 3).any()                    # picked when allowed (all 4 others)
    itm.options.exclude_same_caption = True
    for neg, ok in zip(*[iter(itm.choose_negatives(p))] * 2):
        assert ok.sum(1).tolist() == [3, 3, 3, 3, 4]         # rows 2 / 3 lose one of 4
        assert not (neg[2][ok[2]] == 3).any() and not (neg[3][ok[3]] == 2).any()
