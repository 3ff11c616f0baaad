"""Image-text relation evaluation: the labelled toy splits, the linear probe, the activation map.

One small toy dataset per module (a few hundred relation pairs) and a 1-layer tiny model at its
random initialisation: a frozen random encoder already separates the toy relations far above
chance, which is what the probe's check needs (the pre-trained vs untrained comparison is the
demo's, ``configs/runs/itr_toy.yaml``)."""
from __future__ import annotations

import io
import json
import struct
from collections import Counter

import numpy as np
import pytest

from eval_helpers import data_config, make_model_dir, one_thread, tiny_model
from imagebert_ds.data.shards import iter_samples, list_shards, parse_meta
from imagebert_ds.data.toy import (COLOUR_NAMES, SHAPES, make_toy_data)

pytestmark = pytest.mark.usefixtures("_one_thread")


@pytest.fixture(scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("relation")
    sizes = make_toy_data(out, train=4, test=4, seed=2, relation_train=240, relation_test=120,
                          shard_size=100)
    return out, sizes


def _described(caption: str) -> set:
    """(colour, shape) pairs a toy caption names (either word order of the templates)."""
    words = caption.replace(",", " ").split()
    out = set()
    for i, w in enumerate(words):
        if w in SHAPES:
            near = words[max(0, i - 1):i + 3]
            out |= {(c, w) for c in COLOUR_NAMES if c in near}
    return out


def test_relation_splits_are_balanced_and_labelled_as_defined(toy):
    out, sizes = toy
    assert sizes["relation_train"] == 240 and sizes["relation_test"] == 120
    for split, n in (("relation_train", 240), ("relation_test", 120)):
        labels = Counter()
        for shard in list_shards(out / split):
            for key, comps in iter_samples(shard):
                meta = parse_meta(comps["json"], key)
                t, v, tv = meta["flag_t"], meta["flag_v"], meta["label"]
                assert tv == 2 * t + v
                labels[tv] += 1
                named = _described(comps["txt"].decode())
                cls = np.load(io.BytesIO(comps["cls.npy"]))
                present = {(COLOUR_NAMES[c // 4], SHAPES[c % 4]) for c in cls.tolist()}
                # flag_t: every object named is in the scene; flag_v: the scene shows more
                # (compared on colour + shape: positions are not checked here)
                if t:
                    assert named <= present, (key, comps["txt"])
                if not v:
                    assert present <= named, (key, comps["txt"])
        assert labels == {c: n // 4 for c in range(4)}


def test_existing_splits_unchanged_by_relation_splits(toy, tmp_path):
    out, _ = toy
    make_toy_data(tmp_path, train=4, test=4, seed=2, shard_size=100)
    for split in ("test", "stage1_web", "stage2_clean"):
        for p in (tmp_path / split).iterdir():
            assert p.read_bytes() == (out / split / p.name).read_bytes(), p


def test_probe_beats_chance(toy, tmp_path):
    from imagebert_ds.relation.probe import linear_probe

    out, _ = toy
    model = tiny_model("{itm: 1.0}")
    res = linear_probe(model, out / "relation_train", out / "relation_test", data_config())
    assert res["num_train"] == 240 and res["num_test"] == 120
    assert res["chance_accuracy"] == pytest.approx(25.0)
    assert res["accuracy"] > 40.0  # chance is 25 (balanced 4 classes)
    assert set(res) >= {"accuracy", "f1_t", "f1_v", "f1_tv", "macro_f1_tv"}
    # shuffled labels: the same pipeline falls to chance, so the check above can fail
    from imagebert_ds.relation.probe import fit_and_score

    rng = np.random.default_rng(0)
    x = rng.standard_normal((240, 16)).astype(np.float32)
    y = np.stack([rng.integers(0, 2, 240), rng.integers(0, 2, 240)], 1)
    y = np.concatenate([y, 2 * y[:, :1] + y[:, 1:]], 1)
    assert fit_and_score(x[:160], y[:160], x[160:], y[160:])["accuracy"] < 40.0


def test_probe_cli_and_unlabelled_split_error(toy, tmp_path, capsys):
    from imagebert_ds.cli import main

    out, _ = toy
    model_dir = make_model_dir(tmp_path / "model", objectives="{itm: 1.0}")
    res_file = tmp_path / "probe.json"
    assert main(["probe", "--checkpoint", str(model_dir), "--train", str(out / "relation_train"),
                 "--test", str(out / "relation_test"), "--out", str(res_file),
                 "--device", "cpu"]) == 0
    res = json.loads(res_file.read_text())
    assert res["accuracy"] > 40.0 and res["untrained"] is False
    assert main(["probe", "--checkpoint", str(model_dir), "--train", str(out / "test"),
                 "--test", str(out / "relation_test"), "--device", "cpu"]) == 2
    assert "needs a relation 'label'" in capsys.readouterr().err


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_explain_writes_the_png(toy, tmp_path, capsys):
    from imagebert_ds.cli import main
    from imagebert_ds.relation.explain import ExplainInput, explain, read_sample

    out, _ = toy
    model_dir = make_model_dir(tmp_path / "model", objectives="{itm: 1.0}")
    shard = list_shards(out / "relation_test")[0]
    key = next(iter_samples(shard))[0]
    png = tmp_path / "map.png"
    assert main(["explain", "--checkpoint", str(model_dir), "--sample",
                 f"{out / 'relation_test'}:{key}", "--out", str(png)]) == 0
    w, h = _png_size(png)
    assert w > 100 and h > 100
    assert "ITM log-odds" in capsys.readouterr().out
    # the relevance covers every region, in [0, 1] with the most relevant at 1
    inp = read_sample(f"{shard}:{key}")
    res = explain(tiny_model("{itm: 1.0}"), inp, data_config(), tmp_path / "b.png")
    rel = np.asarray(res["relevance"])
    assert len(rel) == len(inp.roi) and rel.max() == pytest.approx(1.0) and rel.min() >= 0
    # the image + --regions route, and an error naming what is missing
    img = tmp_path / "img.jpg"
    img.write_bytes(inp.image)
    np.save(tmp_path / "roi.npy", inp.roi)
    np.save(tmp_path / "box.npy", inp.box)
    assert main(["explain", "--checkpoint", str(model_dir), "--image", str(img), "--caption",
                 "a red circle", "--regions", str(tmp_path / "roi.npy"),
                 str(tmp_path / "box.npy"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()
    assert main(["explain", "--checkpoint", str(model_dir), "--image", str(img), "--caption",
                 "a red circle", "--out", str(tmp_path / "d.png")]) == 2
    assert "needs the regions" in capsys.readouterr().err
    assert isinstance(inp, ExplainInput)


def test_explain_pixel_mode_draws_the_grid(toy, tmp_path):
    import torch

    from imagebert_ds.data import DataConfig
    from imagebert_ds.model import ImageBERTForPretraining, PretrainingConfig
    from imagebert_ds.relation.explain import explain, read_sample

    out, _ = toy
    cfg = PretrainingConfig.from_yaml("configs/model/pixelbert_tiny.yaml",
                                    ["objectives={itm: 1.0}", "num_layers=1"])
    torch.manual_seed(0)
    model = ImageBERTForPretraining(cfg).eval()
    shard = list_shards(out / "relation_test")[0]
    inp = read_sample(f"{shard}:{next(iter_samples(shard))[0]}")
    dc = DataConfig(max_text_len=40, use_images=True, use_regions=False, image_size=32)
    res = explain(model, inp, dc, tmp_path / "pix.png")
    assert len(res["relevance"]) == 4 * 4  # 32 px at the trunk's stride 8
    assert _png_size(tmp_path / "pix.png")[0] > 100
