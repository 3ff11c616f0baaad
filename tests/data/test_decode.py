"""``decode``: a reader's record -> ``Sample`` or the reason it is bad; the finiteness tests."""
from __future__ import annotations

import json

import numpy as np
import pytest

from imagebert_ds.data.decode import (READ_ERROR, Rejected, Sample, all_finite, decode,
                                      decode_batch, nonfinite_rows)

D = 8
KEY = "/d/shard-000000.tar:1536:k1.txt"
KW = dict(feat_dim=D, use_regions=True, use_images=False)


def record(**over) -> dict:
    r = {"__key__": KEY, "txt": b"a red circle\n\nthe circle is red\n",
         "json": json.dumps({"image_id": 7, "width": 64, "height": 32}).encode(),
         "roi.npy": np.ones((3, D), np.float16), "box.npy": np.zeros((3, 4), np.float32),
         "cls.npy": np.arange(3)}
    r.update(over)
    return r


def test_a_good_record_decodes_to_a_sample_with_every_caption():
    s = decode(record(), **KW)
    assert isinstance(s, Sample)
    assert (s.key, s.image_id, s.width, s.height) == (KEY, 7, 64.0, 32.0)
    assert s.captions == ["a red circle", "the circle is red"] and s.token_ids == []
    assert s.roi.shape == (3, D) and s.cls.tolist() == [0, 1, 2] and s.pixels is None
    assert decode(record(**{"cls.npy": np.zeros(0, np.int64)}), **KW).cls is None  # empty: none
    no_regions = decode({"__key__": KEY, "txt": b"x", "json": b"{}"}, feat_dim=D,
                        use_regions=False, use_images=False)
    assert no_regions.roi is None and no_regions.image_id >= 0  # a hash of shard and key


@pytest.mark.parametrize("over, reason", [
    ({READ_ERROR: ".box.npy: not a valid .npy array (no .npy magic)"},
     ".box.npy: not a valid .npy array (no .npy magic)"),
    ({"json": b"[1]"}, ".json must be a JSON object"),
    ({"json": b"{junk"}, ".json is not valid JSON"),
    ({"txt": b" \n"}, "empty caption (.txt)"),
    ({"json": b'{"image_id": "x"}'}, "image_id must be an integer"),
    ({"json": b'{"width": [1]}'}, "float() argument"),  # a TypeError is a reason too
    ({"roi.npy": np.ones((3, D + 1), np.float16)}, f".roi.npy must have shape (R, {D})"),
    ({"box.npy": np.zeros((2, 4), np.float32)}, "3 features but 2 boxes"),
    ({"cls.npy": np.zeros((2,), np.int64)}, "3 features but .cls.npy of shape (2,)"),
    ({"json": b'{"width": 0, "height": 3}'}, ".json needs positive 'width' and 'height'"),
    ({"box.npy": np.full((3, 4), np.nan, np.float32)}, "non-finite region boxes"),
])
def test_each_problem_is_a_reason_without_the_key(over, reason):
    got = decode(record(**over), **KW)
    assert isinstance(got, Rejected) and got.key == KEY
    assert got.reason.startswith(reason), got.reason
    assert KEY not in got.reason


def test_the_first_problem_wins():
    """The reader's error before the boxes, the boxes before the .json, .json before .txt."""
    nan = np.full((3, 4), np.nan, np.float32)
    assert decode(record(**{READ_ERROR: "unreadable", "box.npy": nan}), **KW).reason == "unreadable"
    assert decode(record(**{"box.npy": nan, "json": b"[]"}), **KW).reason == \
        "non-finite region boxes"
    assert decode(record(json=b"[]", txt=b""), **KW).reason == ".json must be a JSON object"


def test_decode_batch_tests_boxes_at_once_and_finds_exactly_the_bad_ones():
    """One test for the batch's boxes; when it fails, exactly the records with NaN/inf boxes
    are rejected (a record the reader could not read keeps its own reason)."""
    ok = np.zeros((3, 4), np.float32)
    nan, inf = ok.copy(), ok.copy()
    nan[1, 2], inf[0, 0] = np.nan, -np.inf
    recs = [record(**{"box.npy": b}) for b in (ok, nan, ok.copy(), inf)]
    recs.append(record(**{"box.npy": nan.copy(), READ_ERROR: "junk"}))
    got = decode_batch(recs, **KW)
    assert [g.reason if isinstance(g, Rejected) else None for g in got] == [
        None, "non-finite region boxes", None, "non-finite region boxes", "junk"]
    assert all(isinstance(g, Sample) for g in decode_batch([record(), record()], **KW))
    # without regions the boxes are not looked at
    assert isinstance(decode_batch([record(**{"box.npy": nan})], feat_dim=D, use_regions=False,
                                   use_images=False)[0], Sample)


def test_nonfinite_rows_names_the_rows():
    feats = np.zeros((4, 2, D), np.float16)
    feats[1, 1, 3], feats[3, 0, 0] = np.nan, -np.inf
    assert nonfinite_rows(feats) == [1, 3]
    assert nonfinite_rows(feats[[0, 2]]) == []


@pytest.mark.parametrize("neighbour", [1.0, -1.0])  # one max-reduction, or both
def test_all_finite_on_every_float16_bit_pattern(neighbour):
    """The integer-view test of ``all_finite`` against np.isfinite for all 65536 float16 values,
    each alone among finite ones (the chunk boundaries: tests/reliability/test_bad_data.py)."""
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
