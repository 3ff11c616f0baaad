"""Toy dataset: deterministic bytes, learnable content, valid DALI index files."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from imagebert_ds.data.config import load_tokenizer
from imagebert_ds.data.shards import iter_samples, load_npy, read_index
from imagebert_ds.data.toy import (CELL_PHRASES, COLOUR_NAMES, FEAT_DIM, SHAPES, make_toy_data,
                                   projection)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    sizes = make_toy_data(out, train=120, test=20, seed=3, shard_size=50)
    return out, sizes


def test_layout_and_sizes(toy):
    out, sizes = toy
    assert sizes == {"test": 20, "stage1_web": 120, "stage2_clean": 60}
    assert sorted(p.name for p in (out / "stage1_web").iterdir()) == [
        f"shard-00000{i}.{e}" for i in range(3) for e in ("idx", "tar")]
    assert not list(out.rglob("*.tmp"))


def test_same_seed_same_bytes_and_rerun_skips(toy, tmp_path):
    out, _ = toy
    make_toy_data(tmp_path / "a", train=120, test=20, seed=3, shard_size=50)
    assert _digest(tmp_path / "a") == _digest(out)
    make_toy_data(tmp_path / "b", train=120, test=20, seed=4, shard_size=50)
    assert _digest(tmp_path / "b") != _digest(out)
    # a re-run leaves finished shards alone (mtime unchanged) and rewrites a deleted one
    shard = tmp_path / "a" / "stage1_web" / "shard-000001.tar"
    before = shard.stat().st_mtime_ns
    (tmp_path / "a" / "stage2_clean" / "shard-000000.tar").unlink()
    make_toy_data(tmp_path / "a", train=120, test=20, seed=3, shard_size=50)
    assert shard.stat().st_mtime_ns == before
    assert _digest(tmp_path / "a") == _digest(out)


def test_index_points_at_member_data(toy):
    out, _ = toy
    tar = out / "test" / "shard-000000.tar"
    entries = read_index(tar.with_suffix(".idx"))
    raw = tar.read_bytes()
    with tarfile.open(tar) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}
    assert len(entries) == 20
    for e in entries:
        assert set(e.components) == {"jpg", "txt", "json", "roi.npy", "box.npy", "cls.npy"}
        for ext, (off, size) in e.components.items():
            assert raw[off:off + size] == members[f"{e.key}.{ext}"]


def test_test_split_protocol(toy):
    out, _ = toy
    contents, train_contents = set(), set()
    for key, c in iter_samples(out / "test" / "shard-000000.tar"):
        caps = c["txt"].decode().split("\n")
        assert len(caps) == 5 and len(set(caps)) == 5
        meta = json.loads(c["json"])
        roi, box, cls = (load_npy(c[k], k) for k in ("roi.npy", "box.npy", "cls.npy"))
        assert roi.dtype == np.float16 and roi.shape == (len(cls), FEAT_DIM)
        assert box.shape == (len(cls), 4) and meta["width"] == meta["height"] == 64
        # content = which (colour, shape) at which position; all captions mention the same set
        contents.add(caps[0])  # template 0, objects in canonical order
    assert len(contents) == 20  # no two test images with the same caption content
    for split in ("stage1_web", "stage2_clean"):
        for tar in sorted((out / split).glob("*.tar")):
            for _, c in iter_samples(tar):
                meta = json.loads(c["json"])
                assert meta["image_id"] >= 1_000_000
                train_contents.add(meta["caption_kind"])
    assert {"clean", "wrong_colour", "unrelated"} <= train_contents


def test_region_features_encode_colour_and_shape(toy):
    out, _ = toy
    proj = projection()  # (10, 2048)
    for key, c in iter_samples(out / "stage2_clean" / "shard-000000.tar"):
        roi = load_npy(c["roi.npy"], key).astype(np.float32)
        cls = load_npy(c["cls.npy"], key)
        colour, shape = cls // len(SHAPES), cls % len(SHAPES)
        clean = proj[colour] + proj[len(COLOUR_NAMES) + shape]
        assert np.abs(roi - clean).std() < 0.15  # noise sigma 0.1 (+ float16 rounding)


def test_caption_words_are_single_vocab_tokens():
    tok = load_tokenizer(None, 64)
    words = set(COLOUR_NAMES) | set(SHAPES) | {w for p in CELL_PHRASES for w in p.split()} | set(
        "a and there is picture of an image with we see in".split())
    for w in words:
        enc = tok.encode(w, add_special_tokens=False)
        assert enc.tokens == [w], (w, enc.tokens)


def test_written_index_equals_index_from_tar(toy, tmp_path):
    from imagebert_ds.data.shards import write_index

    out, _ = toy
    for tar in out.rglob("*.tar"):
        write_index(tar, tmp_path / "re.idx")
        assert (tmp_path / "re.idx").read_text() == tar.with_suffix(".idx").read_text()


def test_test_scenes_not_nested():
    import numpy as np

    from imagebert_ds.data.toy import make_scenes

    scenes = [frozenset(s) for s in make_scenes(100, np.random.default_rng(0), set(), unique=True)]
    assert all(not (a <= b) for i, a in enumerate(scenes) for j, b in enumerate(scenes) if i != j)
