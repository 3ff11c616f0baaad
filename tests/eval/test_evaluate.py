"""Full and two-stage evaluation on a tiny toy split with a tiny random model (ITM + ITC):
two-stage with k >= every candidate equals full bit for bit, the top-k bookkeeping is right, an
interrupted full evaluation resumes to the uninterrupted result, fold protocols average."""
import pytest
import torch

from eval_helpers import one_thread, data_config, make_split_dir, tiny_model
from imagebert_ds.eval.evaluate import (EvalOptions, evaluate_split, full_scores, outside_topk,
                                        two_stage_scores, table_rows)
from imagebert_ds.eval.protocols import PROTOCOLS, Protocol
from imagebert_ds.eval.retrieval import recall_at_k



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from imagebert_ds.data import load_retrieval_split

    return load_retrieval_split(make_split_dir(tmp_path_factory.mktemp("toy")), data_config())


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def opts(**kw):
    return EvalOptions(batch_size=kw.pop("batch_size", 16), progress=False, **kw)


def test_full_matches_direct_model_calls(split, model):
    s = full_scores(model, split, batch_size=16)
    assert s.shape == (12, 60) and torch.isfinite(s).all()
    i, t = 3, torch.tensor([0, 17, 59])
    with torch.no_grad():
        direct = model.itm_scores(split.input_ids[t], split.attention_mask[t],
                                  split.region_feats[[i] * 3], split.region_boxes[[i] * 3],
                                  split.region_mask[[i] * 3], as_prob=False)
    torch.testing.assert_close(s[i, t], direct, rtol=1e-5, atol=1e-5)  # padding / batching only
    assert s.std() > 0  # a random model still separates pairs (no accidental constant)


def test_two_stage_with_k_all_equals_full(split, model):
    full = evaluate_split(model, split, "full", opts=opts())
    two = evaluate_split(model, split, "two-stage", k=60, opts=opts())
    for key in ("image_to_text", "text_to_image", "rsum", "num_images", "num_texts"):
        assert two[key] == full[key], key
    assert two["outside_topk"] == {"image_to_text": 0.0, "text_to_image": 0.0}
    # the matrices themselves, bit for bit
    m = two_stage_scores(model, split, 60, opts())
    ce = full_scores(model, split, batch_size=16)
    assert torch.equal(m["i2t"], ce) and torch.equal(m["t2i"], ce.t())
    assert full["mode"] == "full" and full["k"] is None and two["k"] == 60
    assert two["protocol"] == "none" and "seconds" in two and "eval_seconds" in two


def test_two_stage_topk_bookkeeping(split, model):
    k = 3
    m = two_stage_scores(model, split, k, opts())
    sim, ce = m["sim"], full_scores(model, split, batch_size=16)
    n_img, n_txt = sim.shape
    for i in range(n_img):  # re-scored candidates keep their ITM order, ahead of all others
        top = set(sim[i].topk(k).indices.tolist())
        assert set(m["i2t_idx"][i].tolist()) == top
        inside = torch.tensor(sorted(top))
        outside = torch.tensor([t for t in range(n_txt) if t not in top])
        assert m["i2t"][i, inside].min() > m["i2t"][i, outside].max()
        torch.testing.assert_close(m["i2t"][i, inside], ce[i, inside], rtol=1e-5, atol=1e-5)
        # outside: the ITC order
        assert torch.equal(m["i2t"][i, outside].argsort(), sim[i, outside].argsort())
    for t in range(n_txt):
        top = torch.tensor(sorted(sim[:, t].topk(k).indices.tolist()))
        rest = torch.tensor([i for i in range(n_img) if i not in top.tolist()])
        assert m["t2i"][t, top].min() > m["t2i"][t, rest].max()
    # outside fractions against a direct count
    t2i = split.text_to_image
    img_out = sum(not any(int(t2i[t]) == i for t in m["i2t_idx"][i]) for i in range(n_img)) / n_img
    txt_out = sum(int(t2i[t]) not in m["t2i_idx"][t].tolist() for t in range(n_txt)) / n_txt
    o = outside_topk(split, m["i2t_idx"], m["t2i_idx"])
    assert o == {"image_to_text": pytest.approx(img_out), "text_to_image": pytest.approx(txt_out)}
    res = evaluate_split(model, split, "two-stage", k=k, opts=opts())
    assert res["outside_topk"] == o
    assert res == {**res, **recall_at_k(m["i2t"], t2i, scores_t2i=m["t2i"])}
    assert res["itc"] == recall_at_k(sim, t2i)


def test_rerank_itm_plus_itc_adds_the_cosine_and_reports_itm_alone(split, model):
    """BLIP's re-ranking: the top-k score ITM + ITC cosine; the ITM-only recalls come with it."""
    m = two_stage_scores(model, split, 60, opts(), rerank="itm+itc")
    ce = full_scores(model, split, batch_size=16)
    torch.testing.assert_close(m["i2t"], ce + m["sim"], rtol=0, atol=1e-6)
    assert torch.equal(m["itm_i2t"], ce)
    fused = evaluate_split(model, split, "two-stage", k=4, opts=opts(), rerank="itm+itc")
    plain = evaluate_split(model, split, "two-stage", k=4, opts=opts())
    assert fused["itm"]["text_to_image"] == plain["text_to_image"]
    assert fused["rerank"] == "itm+itc" and plain["rerank"] == "itm" and "itm" not in plain
    assert [label for label, _ in table_rows(fused)][:2] == ["two-stage (k=4), itm+itc",
                                                             "ITM re-rank only (k=4)"]
    with pytest.raises(ValueError, match="rerank must be one of"):
        two_stage_scores(model, split, 4, opts(), rerank="itc")


def test_two_stage_needs_itc(split):
    with pytest.raises(ValueError, match="no itc head.*--mode full"):
        evaluate_split(tiny_model("{itm: 1.0}"), split, "two-stage", opts=opts())


class Interrupt(Exception):
    pass


def _interrupting(model, after: int):
    """``model`` whose itm_scores raises on call number ``after`` + 1 (mid-row: chunks of 16)."""
    calls = {"n": 0}
    orig = model.itm_scores

    def itm_scores(*a, **kw):
        calls["n"] += 1
        if calls["n"] > after:
            raise Interrupt()
        return orig(*a, **kw)

    model.itm_scores = itm_scores
    return calls, lambda: delattr(model, "itm_scores")


@pytest.mark.parametrize("mode", ["full", "two-stage"])
def test_interrupted_evaluation_resumes_to_the_same_result(split, model, tmp_path, mode):
    ref = evaluate_split(model, split, mode, k=4, opts=opts())
    part = tmp_path / "out.json.partial"
    fp = {"checkpoint": "x"}
    # 60 captions in chunks of 16: 4 calls per full row; stop inside the 6th row
    calls, restore = _interrupting(model, after=22)
    try:
        with pytest.raises(Interrupt):
            evaluate_split(model, split, mode, k=4, opts=opts(partial_dir=part, save_every_s=1e9,
                                                              fingerprint=fp))
    finally:
        restore()
    files = list(part.glob("*.pt"))
    assert files, "finished rows were not saved on the way out"
    saved = sum(len(torch.load(f)["images"]) for f in files)
    assert 0 < saved < split.num_images
    calls, restore = _interrupting(model, after=10 ** 9)
    try:
        res = evaluate_split(model, split, mode, k=4, opts=opts(partial_dir=part, fingerprint=fp))
    finally:
        restore()
    for key in ("image_to_text", "text_to_image", "rsum", "outside_topk", "itc"):
        assert res.get(key) == ref.get(key), key
    if mode == "full":  # only the rows not saved were scored again
        assert calls["n"] == 4 * (split.num_images - saved)
    # different arguments: refused, naming what differs; --fresh starts over
    with pytest.raises(ValueError, match="differing: batch_size"):
        evaluate_split(model, split, mode, k=4, opts=opts(partial_dir=part, fingerprint=fp,
                                                          batch_size=8))
    res = evaluate_split(model, split, mode, k=4, opts=opts(partial_dir=part, fingerprint=fp,
                                                            batch_size=8, fresh=True))
    assert res["num_texts"] == 60


def test_resume_rescores_rows_whose_captions_changed(split, model, tmp_path):
    """A saved two-stage row whose caption list is not the one needed now is scored again."""
    part = tmp_path / "p"
    o = opts(partial_dir=part, save_every_s=0)
    ref = evaluate_split(model, split, "two-stage", k=4, opts=o)
    # corrupt: pretend image 0 was scored for captions [0] only
    torch.save({"images": [0], "texts": [torch.tensor([0])], "scores": [torch.tensor([99.0])]},
               part / "9999999999999999999-r000-000000.pt")
    res = evaluate_split(model, split, "two-stage", k=4, opts=o)
    assert res["image_to_text"] == ref["image_to_text"] and res["rsum"] == ref["rsum"]


def test_fold_protocol_averages_folds(split, model, monkeypatch):
    from imagebert_ds.eval.retrieval import image_range, mean_recalls

    monkeypatch.setitem(PROTOCOLS, "tiny-2x6", Protocol("tiny-2x6", 12, 5, 2, 8))
    res = evaluate_split(model, split, "full", protocol="tiny-2x6", opts=opts())
    per = [evaluate_split(model, image_range(split, a, a + 6), "full", opts=opts())
           for a in (0, 6)]
    want = mean_recalls(per)
    assert res["image_to_text"] == want["image_to_text"] and res["rsum"] == want["rsum"]
    assert len(res["folds"]) == 2 and res["num_images"] == 12 and res["num_texts"] == 60
    two = evaluate_split(model, split, "two-stage", protocol="tiny-2x6", opts=opts())
    assert two["k"] == 8 and set(two["outside_topk"]) == {"image_to_text", "text_to_image"}
    with pytest.raises(ValueError, match="needs 1000 test images"):
        evaluate_split(model, split, "full", protocol="flickr30k-1k", opts=opts())
