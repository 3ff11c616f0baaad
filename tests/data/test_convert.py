"""Converters: Karpathy json, TSV pairs, region-feature merge (TSV and npz), via the CLI."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from imagebert_ds.cli import main
from imagebert_ds.data.shards import iter_samples, list_shards, load_npy, read_index


def _image(path, size=(40, 30), fmt="JPEG", colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def _samples(root):
    return {k: c for tar in list_shards(root) for k, c in iter_samples(tar)}


@pytest.fixture
def karpathy(tmp_path):
    images = tmp_path / "images"
    entries = []
    splits = ["train", "train", "restval", "val", "test", "test", "train"]
    for i, split in enumerate(splits):
        name = f"{1000 + i}.{'png' if i == 1 else 'jpg'}"
        _image(images / name, fmt="PNG" if i == 1 else "JPEG", colour=(i * 30, 0, 0))
        entries.append({"filename": name, "imgid": i, "split": split,
                        "sentids": list(range(5 * i, 5 * i + 5)),
                        "sentences": [{"raw": f"Image {i} caption  {j}.\n", "sentid": 5 * i + j}
                                      for j in range(5)]})
    js = tmp_path / "dataset_flickr30k.json"
    js.write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    return js, images


def test_karpathy_round_trip(karpathy, tmp_path):
    js, images = karpathy
    out = tmp_path / "out"
    argv = ["prepare", "karpathy", "--json", str(js), "--images", str(images), "--out", str(out),
            "--shard-size", "2"]
    assert main(argv) == 0
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["shard-000000.tar",
                                                                      "shard-000001.tar"]
    train, test = _samples(out / "train"), _samples(out / "test")
    assert sorted(train) == ["000000000", "000000001", "000000002", "000000006"]  # + restval
    assert sorted(test) == ["000000004", "000000005"] and len(_samples(out / "val")) == 1
    s = train["000000001"]
    assert s["txt"].decode().split("\n") == [f"Image 1 caption {j}." for j in range(5)]
    meta = json.loads(s["json"])
    assert meta["image_id"] == 1 and meta["width"] == 40 and meta["height"] == 30
    assert Image.open(io.BytesIO(s["jpg"])).format == "JPEG"  # the PNG was re-encoded
    assert train["000000000"]["jpg"] == (images / "1000.jpg").read_bytes()  # JPEG kept as is
    for idx in (out / "train").glob("*.idx"):
        assert len(read_index(idx)) == 2
    # re-run: finished shards are skipped, nothing changes
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    assert main(argv) == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}


def test_karpathy_missing_image_policy(karpathy, tmp_path, capsys):
    js, images = karpathy
    (images / "1004.jpg").unlink()
    argv = ["prepare", "karpathy", "--json", str(js), "--images", str(images)]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 2
    assert "1004.jpg: sample '000000004': cannot read image" in capsys.readouterr().err
    assert main(argv + ["--out", str(tmp_path / "b"), "--missing", "skip"]) == 0
    assert sorted(_samples(tmp_path / "b" / "test")) == ["000000005"]


def test_pairs(tmp_path):
    images = tmp_path / "img"
    for n in ("a.jpg", "sub/b.jpg"):
        _image(images / n)
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("path\tcaption\na.jpg\ta red thing\nsub/b.jpg\tanother\ta tab\n"
                   "a.jpg\tsame image\n")
    assert main(["prepare", "pairs", "--tsv", str(tsv), "--images", str(images),
                 "--out", str(tmp_path / "o"), "--skip-header"]) == 0
    s = _samples(tmp_path / "o")
    metas = {k: json.loads(c["json"]) for k, c in s.items()}
    assert [metas[k]["image_id"] for k in sorted(s)] == [0, 1, 0]  # same image, same id
    assert s["000000003"]["txt"] == b"another a tab"  # whitespace normalized, one line
    bad = tmp_path / "bad.tsv"
    bad.write_text("a.jpg no tab here\n")
    assert main(["prepare", "pairs", "--tsv", str(bad), "--images", str(images),
                 "--out", str(tmp_path / "o2")]) == 2


def _b64(a):
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


@pytest.mark.parametrize("kind", ["tsv", "npz"])
def test_merge_regions(karpathy, tmp_path, kind):
    js, images = karpathy
    out = tmp_path / "out"
    assert main(["prepare", "karpathy", "--json", str(js), "--images", str(images),
                 "--out", str(out)]) == 0
    rng = np.random.default_rng(0)
    feats = {}
    for i in range(6):  # image 6 gets no features
        n = 2 + i % 3
        feats[i] = (rng.standard_normal((n, 2048)).astype(np.float32),
                    rng.uniform(0, 30, (n, 4)).astype(np.float32),
                    rng.dirichlet(np.ones(7), n).astype(np.float32))
    if kind == "tsv":
        src = tmp_path / "feats.tsv"
        src.write_text("".join(f"{i}\t40\t30\t{len(f)}\t{_b64(b)}\t{_b64(f)}\t{_b64(c)}\n"
                               for i, (f, b, c) in feats.items()))
    else:
        src = tmp_path / "npz"
        src.mkdir()
        for i, (f, b, c) in feats.items():
            np.savez(src / f"{i}.npz", features=f, boxes=b, cls_prob=c)
    assert main(["prepare", "regions", "--features", str(src), "--shards", str(out)]) == 0
    merged = {**_samples(out / "train"), **_samples(out / "val"), **_samples(out / "test")}
    for key, c in merged.items():
        i = int(key)
        if i == 6:
            assert "roi.npy" not in c
            continue
        f, b, cl = feats[i]
        np.testing.assert_array_equal(load_npy(c["roi.npy"], key), f.astype(np.float16))
        np.testing.assert_array_equal(load_npy(c["box.npy"], key), b)
        np.testing.assert_array_equal(load_npy(c["cls.npy"], key), cl)
        assert "jpg" in c and "txt" in c
    for idx in out.rglob("*.idx"):  # indices rewritten with the new components
        assert all("roi.npy" in e.components or e.key.endswith("6") for e in read_index(idx))


def test_karpathy_coco_layout(tmp_path):
    """dataset_coco.json: images under <images>/<filepath>/, image_id = cocoid."""
    images = tmp_path / "coco"
    entries = []
    for i, (folder, split) in enumerate([("train2014", "train"), ("val2014", "restval"),
                                         ("val2014", "test")]):
        name = f"COCO_{folder}_{i:012d}.jpg"
        _image(images / folder / name)
        entries.append({"filepath": folder, "filename": name, "imgid": i, "cocoid": 500 + i,
                        "split": split, "sentids": [i], "sentences": [{"raw": f"cap {i}"}]})
    js = tmp_path / "dataset_coco.json"
    js.write_text(json.dumps({"dataset": "coco", "images": entries}))
    assert main(["prepare", "karpathy", "--json", str(js), "--images", str(images),
                 "--out", str(tmp_path / "o")]) == 0
    train = _samples(tmp_path / "o" / "train")
    assert sorted(train) == ["000000500", "000000501"]
    assert json.loads(train["000000501"]["json"])["source"] == "coco"
    assert sorted(_samples(tmp_path / "o" / "test")) == ["000000502"]
