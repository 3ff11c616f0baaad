"""The collator alone (no DALI): masking statistics, ITM negatives, padding, region targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from imagebert_ds.data.collator import IGNORE, PretrainCollator, Sample, box_features

V, PAD, CLS, SEP, MASK, UNK = 1000, 0, 101, 102, 103, 100
D = 16


def make_collator(**kw) -> PretrainCollator:
    args = dict(vocab_size=V, pad_id=PAD, cls_id=CLS, sep_id=SEP, mask_id=MASK,
                special_ids=[UNK], max_regions=6, region_feat_dim=D)
    args.update(kw)
    return PretrainCollator(**args)


def make_samples(n: int, rng: np.random.Generator, n_images: int | None = None,
                 cls_dist: bool = False) -> list[Sample]:
    out = []
    for i in range(n):
        L = int(rng.integers(3, 30))
        toks = [CLS] + list(rng.integers(1000 - 800, 1000, size=L)) + [SEP]
        R = int(rng.integers(1, 9))  # sometimes more than max_regions (6)
        cls = rng.random((R, 5)).astype(np.float32) if cls_dist else rng.integers(0, 20, R)
        out.append(Sample(key=f"s.tar:{i}", image_id=i % (n_images or n), token_ids=toks,
                          width=100.0, height=50.0,
                          roi=rng.standard_normal((R, D)).astype(np.float16),
                          box=np.tile(np.array([[10, 5, 60, 45]], np.float32), (R, 1)), cls=cls))
    return out


def test_shapes_dtypes_and_padding():
    rng = np.random.default_rng(0)
    samples = make_samples(8, rng)
    b = make_collator(itm_neg_prob=0.0)(samples, rng)
    Lt = max(len(s.token_ids) for s in samples)
    assert b["input_ids"].shape == (8, Lt) and b["input_ids"].dtype == torch.int64
    assert b["attention_mask"].sum(1).tolist() == [len(s.token_ids) for s in samples]
    assert (b["input_ids"][b["attention_mask"] == 0] == PAD).all()
    assert b["region_feats"].shape == (8, 6, D) and b["region_feats"].dtype == torch.float16
    assert b["region_boxes"].shape == (8, 6, 5) and b["region_mask"].dtype == torch.int64
    assert b["region_mask"].sum(1).tolist() == [min(len(s.roi), 6) for s in samples]
    assert b["itm_labels"].tolist() == [1] * 8
    assert b["image_ids"].tolist() == list(range(8))
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "mlm_labels", "itm_labels",
                      "image_ids", "region_feats", "region_boxes", "region_mask", "region_masked",
                      "moc_labels"}
    b32 = make_collator(itm_neg_prob=0.0, region_dtype="float32")(samples, rng)
    assert b32["region_feats"].dtype == torch.float32


def test_box_location_formula():
    loc = box_features(np.array([[10, 5, 60, 45]], np.float32), 100, 50, "k")
    np.testing.assert_allclose(loc, [[0.1, 0.1, 0.6, 0.9, 0.5 * 0.8]], rtol=1e-6)
    with pytest.raises(ValueError, match="k: .json needs positive 'width'"):
        box_features(np.zeros((1, 4), np.float32), 0, 50, "k")


def test_mlm_statistics_and_special_tokens_untouched():
    rng = np.random.default_rng(1)
    col = make_collator(itm_neg_prob=0.0)
    ids = rng.integers(200, V, size=(400, 60))
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[:, 30:33] = UNK
    attn = np.ones_like(ids)
    attn[:200, 50:] = 0  # padded tail
    ids[:200, 50:] = PAD
    out, labels = col.mask_tokens(ids, attn, rng)
    sel = labels != IGNORE
    maskable = (attn == 1) & ~np.isin(ids, [PAD, CLS, SEP, MASK, UNK])
    assert not (sel & ~maskable).any()  # never special tokens nor padding
    assert (out[~sel] == ids[~sel]).all()  # unselected positions unchanged
    assert (labels[sel] == ids[sel]).all()
    frac = sel.sum() / maskable.sum()  # n ~ 19k: std of the fraction ~0.0026
    assert abs(frac - 0.15) < 0.015
    n = sel.sum()
    to_mask = (out[sel] == MASK).mean()
    kept = (out[sel] == ids[sel]).mean()
    rand = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03 and abs(rand - 0.1) < 0.03, n
    assert not np.isin(out[sel & (out != ids) & (out != MASK)], [PAD, CLS, SEP, MASK, UNK]).any()


def test_itm_negatives_never_own_image():
    rng = np.random.default_rng(2)
    col = make_collator(mlm_prob=0.0)
    n_neg = n = 0
    for _ in range(50):
        samples = make_samples(16, rng, n_images=5)  # duplicate image_ids in the batch
        b = col(samples, rng)
        own = {s.image_id: [] for s in samples}
        for s in samples:
            own[s.image_id].append(s.token_ids)
        for i, s in enumerate(samples):
            text = b["input_ids"][i][b["attention_mask"][i] == 1].tolist()
            if b["itm_labels"][i] == 1:
                assert text == s.token_ids
            else:
                assert text not in own[s.image_id]  # a caption of a different image
                assert any(text == t.token_ids for t in samples if t.image_id != s.image_id)
        n_neg += int((b["itm_labels"] == 0).sum())
        n += 16
    assert abs(n_neg / n - 0.5) < 0.06  # n = 800


def _itm_ref(samples, p, rng):
    """The ITM draw written plainly: per row, ``rng.choice`` over the rows of other images."""
    ids = np.asarray([s.image_id for s in samples])
    texts, labels = [], []
    for i in range(len(samples)):
        others = np.flatnonzero(ids != ids[i])
        if len(others) and rng.random() < p:
            texts.append(samples[int(rng.choice(others))].token_ids)
            labels.append(0)
        else:
            texts.append(samples[i].token_ids)
            labels.append(1)
    return texts, labels


@pytest.mark.parametrize("n_images", [None, 5, 1])  # all distinct, duplicates, all one image
def test_itm_draws_equal_the_plain_reference(n_images):
    """The collator's ITM partner draw is the plain per-row ``rng.choice`` draw, random number
    for random number (so batches and the golden losses do not depend on the shortcut)."""
    col = make_collator()
    data = np.random.default_rng(7)
    for trial in range(20):
        samples = make_samples(int(data.integers(2, 40)), data, n_images=n_images)
        a, b = np.random.default_rng(trial), np.random.default_rng(trial)
        src, labels = col.itm_pairs(samples, a)
        texts = [samples[j].token_ids for j in src]
        ref_texts, ref_labels = _itm_ref(samples, col.itm_neg_prob, b)
        assert texts == ref_texts and labels.tolist() == ref_labels
        assert a.random() == b.random()  # the same numbers drawn


def test_itm_all_same_image_gives_positives_only():
    rng = np.random.default_rng(3)
    b = make_collator()(make_samples(6, rng, n_images=1), rng)
    assert b["itm_labels"].tolist() == [1] * 6


def test_region_masking_and_targets():
    rng = np.random.default_rng(4)
    col = make_collator(itm_neg_prob=0.0)
    masked_frac = []
    for _ in range(40):
        samples = make_samples(16, rng)
        b = col(samples, rng)
        m, real = b["region_masked"], b["region_mask"] == 1
        assert not (m & ~real).any()
        for i, s in enumerate(samples):
            n = min(len(s.roi), 6)
            # the original features, masked or not (the model zeroes masked ones), zero padding
            assert torch.equal(b["region_feats"][i, :n], torch.from_numpy(s.roi[:n]))
            assert (b["region_feats"][i, n:] == 0).all()
            labels = b["moc_labels"][i, :n]
            assert (labels[m[i, :n]] == torch.from_numpy(s.cls[:n])[m[i, :n]]).all()
            assert (labels[~m[i, :n]] == IGNORE).all()
        masked_frac.append((m.sum() / real.sum()).item())
    assert abs(np.mean(masked_frac) - 0.15) < 0.02  # ~2.5k real regions


def test_class_distribution_variant():
    rng = np.random.default_rng(5)
    samples = make_samples(4, rng, cls_dist=True)
    b = make_collator(region_mask_prob=1.0)(samples, rng)
    assert b["moc_probs"].shape == (4, 6, 5)
    n = min(len(samples[0].roi), 6)
    assert b["moc_labels"][0, :n].tolist() == samples[0].cls[:n].argmax(1).tolist()


def test_bad_feature_shape_names_the_key():
    rng = np.random.default_rng(6)
    samples = make_samples(3, rng)
    samples[1].roi = np.zeros((2, D + 1), np.float16)
    with pytest.raises(ValueError, match=r"s.tar:1: .roi.npy must have shape \(R, 16\)"):
        make_collator()(samples, rng)


def test_pad_regions_on_a_thread_pool_equals_one_thread_and_checks_finiteness():
    from concurrent.futures import ThreadPoolExecutor

    from imagebert_ds.data.collator import pad_regions

    rng = np.random.default_rng(0)
    samples = make_samples(7, rng)
    one = pad_regions(samples, 5, samples[0].roi.shape[1], np.float16, check_finite=True)
    with ThreadPoolExecutor(3) as pool:
        many = pad_regions(samples, 5, samples[0].roi.shape[1], np.float16, pool=pool, workers=3,
                           check_finite=True)
        assert one.feats_finite is True and many.feats_finite is True
        np.testing.assert_array_equal(one.feats, many.feats)
        samples[5].roi = samples[5].roi.copy()
        samples[5].roi[0, 0] = np.nan
        bad = pad_regions(samples, 5, samples[0].roi.shape[1], np.float16, pool=pool, workers=3,
                          check_finite=True)
        assert bad.feats_finite is False
    assert pad_regions(samples, 5, samples[0].roi.shape[1]).feats_finite is None  # not asked


def _pad_regions_ref(samples, R, D):
    """pad_regions written plainly, sample by sample (what the batched scatter must equal)."""
    B = len(samples)
    feats, raw = np.zeros((B, R, D), np.float32), np.zeros((B, R, 4), np.float32)
    mask, labels = np.zeros((B, R), np.int64), np.full((B, R), IGNORE, np.int64)
    n_cls = max((s.cls.shape[1] for s in samples if s.cls is not None and s.cls.ndim == 2),
                default=0)
    probs = np.zeros((B, R, n_cls), np.float32)
    boxes = np.zeros((B, R, 5), np.float32)
    for i, s in enumerate(samples):
        n = min(len(s.roi), R)
        feats[i, :n], mask[i, :n] = s.roi[:n], 1
        if n:
            boxes[i, :n] = box_features(s.box[:n], s.width, s.height)
        if s.cls is not None and s.cls.ndim == 2:
            probs[i, :n, :s.cls.shape[1]], labels[i, :n] = s.cls[:n], s.cls[:n].argmax(1)
        elif s.cls is not None:
            labels[i, :n] = s.cls[:n]
    return feats, boxes, mask, labels, probs


@pytest.mark.parametrize("cls_kind", ["labels", "none", "mixed"])
def test_pad_regions_batched_equals_the_per_sample_reference(cls_kind):
    """Awkward batches: samples without regions, more regions than R, float64 boxes, class
    labels / none / a mix of labels, distributions and none."""
    from imagebert_ds.data.collator import pad_regions

    rng = np.random.default_rng(11)
    for trial in range(10):
        samples = make_samples(int(rng.integers(1, 12)), rng)
        for j, s in enumerate(samples):
            if j % 4 == 1:  # no regions at all
                s.roi, s.box, s.cls = s.roi[:0], s.box[:0], s.cls[:0]
            s.box = (s.box * rng.uniform(0.5, 1.5)).astype(np.float64)
            s.width, s.height = float(rng.integers(60, 200)), float(rng.integers(40, 100))
            if cls_kind == "none" or (cls_kind == "mixed" and j % 3 == 0):
                s.cls = None
            elif cls_kind == "mixed" and j % 3 == 1:
                s.cls = rng.random((len(s.roi), int(rng.integers(2, 6)))).astype(np.float32)
        got = pad_regions(samples, 6, D)
        feats, boxes, mask, labels, probs = _pad_regions_ref(samples, 6, D)
        np.testing.assert_array_equal(got.feats, feats)
        np.testing.assert_array_equal(got.mask, mask)
        np.testing.assert_allclose(got.boxes, boxes, rtol=1e-6, atol=1e-7)  # f64 boxes: rounding
        if cls_kind == "none":
            assert got.labels is None and got.probs is None
        else:
            np.testing.assert_array_equal(got.labels, labels)
            if probs.shape[2]:
                np.testing.assert_array_equal(got.probs, probs)


def test_pad_tokens_lengths_one_to_many():
    from imagebert_ds.data.collator import pad_tokens

    seqs = [[5], [1, 2, 3, 4, 5, 6, 7], [9, 9], list(range(100, 141))]
    ids, attn = pad_tokens(seqs, PAD)
    assert ids.shape == attn.shape == (4, 41) and ids.dtype == attn.dtype == np.int64
    for i, t in enumerate(seqs):
        assert ids[i, :len(t)].tolist() == t and (ids[i, len(t):] == PAD).all()
        assert attn[i].tolist() == [1] * len(t) + [0] * (41 - len(t))


def test_begin_copies_on_threads_equal_pad_regions_and_call():
    """``begin``: features copied on two threads, a job of 6 and a short one, give the batch
    ``pad_regions`` gives, and ``__call__`` (same draws) gives the same batch; the handle's
    ``feats_finite`` is known once its result is; a NaN feature shows there."""
    from imagebert_ds.data.collator import pad_regions

    rng = np.random.default_rng(5)
    samples = make_samples(11, rng)  # 11: a job of 6 per copy thread and a short last one
    col = make_collator(read_threads=2)
    handle = col.begin(samples, np.random.default_rng(0))
    b = handle.result()
    ref = pad_regions(samples, 6, D, np.float16, check_finite=True)
    np.testing.assert_array_equal(b["region_feats"].numpy(), ref.feats)
    np.testing.assert_array_equal(b["region_boxes"].numpy(), ref.boxes)
    assert handle.feats_finite is True
    plain = col(samples, np.random.default_rng(0))
    assert col.last_feats_finite is True
    for k in b:
        assert torch.equal(b[k], plain[k]), k
    samples[7].roi = samples[7].roi.copy()
    samples[7].roi[0, 3] = np.inf
    bad = col.begin(samples, np.random.default_rng(0))
    bad.wait()
    assert bad.feats_finite is None  # not known before result()
    bad.result()
    assert bad.feats_finite is False
    col.close()


def test_begin_tokenizes_only_the_captions_shown():
    """``begin`` with captions: ``encode`` runs once, on the rows the ITM pairs show, and their
    ``token_ids`` are what the batch holds."""
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return [[CLS] + [200 + len(t)] * len(t) + [SEP] for t in texts]

    rng = np.random.default_rng(2)
    samples = make_samples(8, rng)
    for s in samples:
        s.token_ids = []
    captions = ["x" * (i + 1) for i in range(8)]
    col = make_collator(encode=encode, mlm_prob=0.0, itm_neg_prob=0.5)
    b = col.begin(samples, np.random.default_rng(4), captions).result()
    src, _ = make_collator(itm_neg_prob=0.5).itm_pairs(samples, np.random.default_rng(4))
    assert len(calls) == 1 and calls[0] == [captions[j] for j in sorted(set(src))]
    for i, j in enumerate(src):
        n = j + 1
        assert b["input_ids"][i, :n + 2].tolist() == [CLS] + [200 + n] * n + [SEP]


def test_pad_regions_when_every_slot_is_real():
    """All samples with at least max_regions regions: the copy path (no scatter) of the boxes
    and labels equals the per-sample reference."""
    from imagebert_ds.data.collator import pad_regions

    rng = np.random.default_rng(12)
    samples = make_samples(9, rng)
    for s in samples:
        n = 6 + int(rng.integers(0, 3))
        s.roi = rng.standard_normal((n, D)).astype(np.float16)
        s.box = rng.uniform(0, 50, (n, 4)).astype(np.float32)
        s.cls = rng.integers(0, 20, n)
    got = pad_regions(samples, 6, D)
    feats, boxes, mask, labels, _ = _pad_regions_ref(samples, 6, D)
    assert mask.all()
    np.testing.assert_array_equal(got.feats, feats)
    np.testing.assert_array_equal(got.boxes, boxes)
    np.testing.assert_array_equal(got.labels, labels)


