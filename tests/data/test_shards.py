"""Plain shard reading and the DALI index agree on what the samples are."""
from __future__ import annotations

import io
import tarfile

from imagebert_ds.data.shards import iter_samples, read_index, write_index


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_hidden_files_and_dirs_skipped_like_the_index(tmp_path):
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        _add(tf, "000001.txt", b"a cat")
        _add(tf, "000001.json", b"{}")
        _add(tf, "._000001.txt", b"macOS resource fork")  # AppleDouble: not a sample
        _add(tf, "sub/.hidden.txt")
        _add(tf, "000002.txt", b"a dog")
    write_index(tar, tmp_path / "s.idx")
    indexed = [(e.key, sorted(e.components)) for e in read_index(tmp_path / "s.idx")]
    plain = [(k, sorted(c)) for k, c in iter_samples(tar)]
    assert plain == indexed == [("000001", ["json", "txt"]), ("000002", ["txt"])]
    assert dict(iter_samples(tar))["000001"]["txt"] == b"a cat"


def test_npy_ref_reads_members_straight_from_the_shard(tmp_path):
    """The loader's direct feature read: shape/dtype from the header, the payload into a buffer
    (rows cut, converting when dtype or order differ); a truncated member names shard and key."""
    import numpy as np
    import pytest

    from imagebert_ds.data.shards import ShardFiles, ShardWriter, npy_bytes

    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 8)).astype(np.float16)
    f = np.asfortranarray(rng.standard_normal((4, 8)).astype(np.float32))
    shard = tmp_path / "s.tar"
    with ShardWriter(shard) as w:
        w.write("k1", {"roi.npy": npy_bytes(a), "txt": b"x"})
        buf = io.BytesIO()
        np.save(buf, f)  # np.save keeps Fortran order
        w.write("k2", {"roi.npy": buf.getvalue(), "txt": b"y"})
        w.write("k3", {"roi.npy": npy_bytes(a)[:-10], "txt": b"z"})
        w.write("k4", {"txt": b"no features"})
    files = ShardFiles({str(shard): shard.with_suffix(".idx")})
    r1 = files.npy(str(shard), "k1", "roi.npy")
    assert r1.shape == (5, 8) and r1.ndim == 2 and len(r1) == 5 and r1.dtype == np.float16
    out = np.zeros((3, 8), np.float16)
    r1.read_into(out)
    np.testing.assert_array_equal(out, a[:3])
    np.testing.assert_array_equal(np.asarray(r1), a)
    r2 = files.npy(str(shard), "k2", "roi.npy")
    out16 = np.zeros((4, 8), np.float16)
    r2.read_into(out16)  # Fortran order, float32 -> float16 buffer
    np.testing.assert_array_equal(out16, f.astype(np.float16))
    with pytest.raises(ValueError, match=r"s\.tar:k3 \(\.roi\.npy\): \.npy is truncated"):
        files.npy(str(shard), "k3", "roi.npy")
    assert files.npy(str(shard), "k4", "roi.npy") is None
    with pytest.raises(ValueError, match="key not in the shard's index"):
        files.npy(str(shard), "nope", "roi.npy")
    # the batched form: the same refs, None and errors in place (k1 twice: the header cache)
    keys = ["k1", "k2", "k3", "k4", "nope", "k1"]
    got = files.npy_refs([(str(shard), k) for k in keys] + [("other.tar", "k1")], "roi.npy")
    for k, ref in zip(keys, got):
        try:
            want = files.npy(str(shard), k, "roi.npy")
        except ValueError as e:
            assert isinstance(ref, ValueError) and str(ref) == str(e)
            continue
        if want is None:
            assert ref is None
        else:
            assert (ref.offset, ref.nbytes, ref.shape, ref.dtype, ref.fortran, ref.where) == (
                want.offset, want.nbytes, want.shape, want.dtype, want.fortran, want.where)
            np.testing.assert_array_equal(np.asarray(ref), np.asarray(want))
    assert isinstance(got[-1], ValueError) and "not a shard of this source" in str(got[-1])
    files.close()


def test_npy_refs_outlive_the_shard_files_lru(tmp_path):
    """A batch can span more shards than ``ShardFiles`` keeps open (a shuffle buffer across many
    small shards): a reference taken before its shard was evicted must still read its own
    shard's bytes -- not fail on a closed descriptor, nor read whichever shard reused its number."""
    import numpy as np

    from imagebert_ds.data.shards import ShardFiles, ShardWriter, npy_bytes

    arrays, index_of = [], {}
    for i in range(4):
        shard = tmp_path / f"s{i}.tar"
        arrays.append(np.full((3, 8), i + 1, np.float16))
        with ShardWriter(shard) as w:  # identical layout: the same member offsets in every shard
            w.write("k", {"roi.npy": npy_bytes(arrays[i]), "txt": b"x"})
        index_of[str(shard)] = shard.with_suffix(".idx")
    files = ShardFiles(index_of, max_open=2)
    refs = [files.npy(str(tmp_path / f"s{i}.tar"), "k", "roi.npy") for i in range(4)]
    files.close()
    other = ShardFiles(index_of)  # new descriptors, likely the numbers the evicted ones had
    keep = [other.npy(str(tmp_path / f"s{i}.tar"), "k", "roi.npy") for i in (3, 2)]
    for ref, a in zip(refs, arrays):
        out = np.zeros((3, 8), np.float16)
        ref.read_into(out)
        np.testing.assert_array_equal(out, a)
    assert len(keep) == 2


def test_npy_views_of_a_column_equal_npy_view_each():
    """The DALI-batch parse (header parsed once while it repeats) gives what ``npy_view`` gives
    buffer by buffer: other shapes, Fortran order, and junk or truncated buffers behind a valid
    one with the same header are still caught, naming the component."""
    import numpy as np

    from imagebert_ds.data.shards import npy_bytes, npy_view, npy_views

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)).astype(np.float32), rng.integers(0, 9, 5)
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(rng.standard_normal((2, 3))))
    raw = [npy_bytes(a), npy_bytes(a + 1), npy_bytes(b), npy_bytes(a), buf.getvalue(),
           npy_bytes(a)[:-4], b"junk", npy_bytes(a)]
    bufs = [np.frombuffer(r, np.uint8) for r in raw]
    bad: dict[int, str] = {}
    got = npy_views(bufs, ".box.npy", bad)
    assert sorted(bad) == [5, 6]
    assert "truncated" in bad[5] and ".box.npy" in bad[6]
    for i, (g, r) in enumerate(zip(got, bufs)):
        if i in bad:
            assert g is r
        else:
            np.testing.assert_array_equal(g, npy_view(r, ".box.npy"))
            assert g.dtype == npy_view(r, ".box.npy").dtype


def test_npy_ref_refuses_a_shard_cut_short_after_it_was_mapped(tmp_path):
    """The payload is read through the shard's memory map, where bytes past a file cut short
    since would fault (SIGBUS): the read checks the file first and names shard and key."""
    import numpy as np
    import pytest

    from imagebert_ds.data.shards import ShardFiles, ShardWriter, npy_bytes

    a = np.arange(40, dtype=np.float16).reshape(5, 8)
    shard = tmp_path / "s.tar"
    with ShardWriter(shard) as w:
        w.write("k1", {"roi.npy": npy_bytes(a), "txt": b"x"})
    files = ShardFiles({str(shard): shard.with_suffix(".idx")})
    ref = files.npy(str(shard), "k1", "roi.npy")
    np.testing.assert_array_equal(np.asarray(ref), a)
    with open(shard, "r+b") as f:
        f.truncate(ref.offset + 10)
    out = np.zeros((5, 8), np.float16)
    with pytest.raises(ValueError, match=r"s\.tar:k1 \(\.roi\.npy\): the shard is now \d+ bytes"):
        ref.read_into(out)
    with pytest.raises(ValueError, match="the shard changed on disk"):
        np.asarray(ref)


def test_npy_column_of_a_dense_dali_column_equals_npy_views():
    """Same-size buffers (a DALI column of boxes) parsed at once give ``npy_views``' arrays;
    a row with another header (shape, dtype, junk) falls back to the row-by-row parse, which
    still names the bad row."""
    import numpy as np

    from imagebert_ds.data.shards import npy_bytes, npy_column, npy_views

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(5)]
    dense = np.stack([np.frombuffer(npy_bytes(a), np.uint8) for a in arrays])
    got = npy_column(dense, ".box.npy", bad := {})
    assert not bad and len(got) == 5
    for g, a in zip(got, arrays):
        np.testing.assert_array_equal(g, a)
    other = np.frombuffer(npy_bytes(arrays[0].astype(np.float64)[:, :2]), np.uint8)
    assert len(other) == dense.shape[1]  # the same size, another header
    mixed = dense.copy()
    mixed[2] = other
    mixed[3, :6] = 0  # junk: no .npy magic
    got = npy_column(mixed, ".box.npy", bad := {})
    want = npy_views(list(mixed), ".box.npy", want_bad := {})
    assert bad == want_bad and list(bad) == [3] and "not a valid .npy" in bad[3]
    np.testing.assert_array_equal(got[2], arrays[0].astype(np.float64)[:, :2])
    for i in (0, 1, 4):
        np.testing.assert_array_equal(got[i], want[i])


def test_feature_gather_refuses_a_shard_cut_short_after_it_was_mapped(tmp_path):
    """The collator's one-call gather from the shards' maps checks each shard's size first: a
    shard cut short since it was mapped raises an error naming shard and key (re-raised by
    ``result()``) instead of faulting the process on the vanished pages."""
    import numpy as np
    import pytest

    from imagebert_ds.data.collator import Sample, pad_regions
    from imagebert_ds.data.shards import ShardFiles, ShardWriter, npy_bytes

    a = np.ones((4, 2048), np.float16)  # 16 KB: the tail spans whole pages
    shard = tmp_path / "s.tar"
    with ShardWriter(shard) as w:
        for k in ("k1", "k2"):
            w.write(k, {"roi.npy": npy_bytes(a), "txt": b"x"})
    files = ShardFiles({str(shard): shard.with_suffix(".idx")})
    samples = [Sample(key=f"s.tar:{k}", image_id=i, token_ids=[], width=10.0, height=10.0,
                      roi=files.npy(str(shard), k, "roi.npy"),
                      box=np.zeros((4, 4), np.float32)) for i, k in enumerate(("k1", "k2"))]
    ok = pad_regions(samples, 4, 2048, np.float16, check_finite=True)
    assert ok.feats_finite and (ok.feats == 1).all()
    with open(shard, "r+b") as f:
        f.truncate(samples[1].roi.offset)  # k2's features are gone
    with pytest.raises(ValueError, match=r"s\.tar:k2 \(\.roi\.npy\): the shard is now \d+ bytes"):
        pad_regions(samples, 4, 2048, np.float16)
