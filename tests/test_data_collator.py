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


@pytest.mark.parametrize("neighbour", [1.0, -1.0])  # one max-reduction, or both
def test_all_finite_on_every_float16_bit_pattern(neighbour):
    """The integer-view test of ``all_finite`` against np.isfinite for all 65536 float16 values,
    each alone among finite ones (the chunk boundaries: tests/reliability/test_bad_data.py)."""
    from imagebert_ds.data.collator import all_finite

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = np.isfinite(bits.view(np.float16))
    a = np.full(3, neighbour, np.float16)
    u = a.view(np.uint16)
    got = np.empty(len(bits), bool)
    for b in bits:
        u[1] = b
        got[b] = all_finite(a)
    np.testing.assert_array_equal(got, want)
    assert (~want).sum() == 2 * 1024  # exponent all ones: +-inf and the NaNs, either sign


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


def test_region_reads_started_while_picking_equal_pad_regions():
    """``region_reads``: features read on the pool a chunk at a time as samples are added give
    the batch ``pad_regions`` gives; a wrong number of samples, or reads started for other
    samples than the batch's, are refused."""
    from imagebert_ds.data.collator import pad_regions

    rng = np.random.default_rng(5)
    samples = make_samples(11, rng)  # 11: a job of 6 per pool thread and a short last one
    col = make_collator(read_threads=2)
    reads = col.region_reads(len(samples))
    for s in samples:
        reads.add(s)
    b = col(samples, np.random.default_rng(0), regions=reads)
    ref = pad_regions(samples, 6, D, np.float16, check_finite=True)
    np.testing.assert_array_equal(b["region_feats"].numpy(), ref.feats)
    np.testing.assert_array_equal(b["region_boxes"].numpy(), ref.boxes)
    assert col.last_feats_finite is True
    plain = col(samples, np.random.default_rng(0))  # reads started inside, same draws
    for k in b:
        assert torch.equal(b[k], plain[k]), k
    with pytest.raises(ValueError, match="is full"):
        reads.add(samples[0])
    short = col.region_reads(len(samples))
    short.add(samples[0])
    with pytest.raises(ValueError, match="1 samples added to a batch of 11"):
        short.finish()
    other = col.read_regions(samples[::-1])
    with pytest.raises(ValueError, match="other samples"):
        col(samples, rng, regions=other)


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


def test_buffer_pool_reuses_a_buffer_only_once_nothing_refers_to_it():
    """A batch buffer goes back to the pool when its tensor, every view of it and every
    ``.numpy()`` of those are gone -- not while any of them is alive."""
    import gc

    from imagebert_ds.data.collator import BufferPool

    pool = BufferPool(keep=2)
    t = pool.tensor((4, 3, 8), np.float16)
    ptr = t.data_ptr()
    views = [t[1], t.numpy()[2:], t.view(torch.int16)]
    del t
    while views:  # each kind of view alone keeps the buffer out of the pool
        gc.collect()
        other = pool.tensor((4, 3, 8), np.float16)
        assert other.data_ptr() != ptr
        del other, views[0]
    gc.collect()
    again = pool.tensor((4, 3, 8), np.float16)
    assert again.data_ptr() == ptr and again.shape == (4, 3, 8) and again.dtype == torch.float16
    assert pool.tensor((2, 2), np.float32).data_ptr() != ptr  # another size: another buffer


def test_serial_torch_pool_threads_run_torch_single_threaded():
    """The collator's pool threads run their torch ops on one thread each (no OpenMP workers
    under every copy); the caller's setting and the default of new threads are unchanged."""
    import threading

    from imagebert_ds.data.collator import serial_torch_pool

    before = torch.get_num_threads()
    pool = serial_torch_pool(2, "t")
    try:
        assert [f.result() for f in [pool.submit(torch.get_num_threads) for _ in range(4)]] == [1] * 4
    finally:
        pool.shutdown()
    assert torch.get_num_threads() == before
    seen = []
    th = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    th.start()
    th.join()
    assert seen == [before]


def test_nonfinite_boxes_are_marked_bad_as_a_dali_batch_is_parsed():
    """One test for the batch's boxes; when it fails, exactly the samples with NaN/inf boxes
    are marked (the loader then skips them like any bad sample)."""
    from imagebert_ds.data.dali_source import _mark_nonfinite_boxes

    ok = np.zeros((3, 4), np.float32)
    nan, inf = ok.copy(), ok.copy()
    nan[1, 2], inf[0, 0] = np.nan, -np.inf
    samples = [{"box.npy": ok}, {"box.npy": nan}, {"box.npy": ok.copy()}, {"box.npy": inf},
               {"box.npy": nan.copy(), "__bad__": "junk"}, {"txt": b"no boxes"}]
    _mark_nonfinite_boxes(samples)
    assert [s.get("__bad__") for s in samples] == [
        None, "non-finite region boxes", None, "non-finite region boxes", "junk", None]
    clean = [{"box.npy": ok}, {"box.npy": ok.copy()}]
    _mark_nonfinite_boxes(clean)
    assert not any("__bad__" in s for s in clean)


def test_copy_threads_leave_the_producer_a_cpu(monkeypatch):
    """``data.num_threads`` 1: the producer copies; else at most the CPUs but one, at least 1."""
    import os

    from imagebert_ds.data.collator import copy_threads

    for cpus, asked, want in [(2, 1, 0), (2, 2, 1), (2, 8, 1), (1, 4, 1), (16, 4, 4), (4, 8, 3)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert copy_threads(asked) == want, (cpus, asked)
