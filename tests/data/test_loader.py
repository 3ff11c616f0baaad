"""The DALI loader on the CPU: rank sharding, resume, source mixing, bad input, retrieval split."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI (nvidia-dali-cuda120) is not installed")

from imagebert_ds.config_utils import ConfigError, from_dict  # noqa: E402
from imagebert_ds.data import DataConfig, build_pretrain_loader, load_retrieval_split  # noqa: E402
from imagebert_ds.data.dali_source import MissingComponentError  # noqa: E402
from imagebert_ds.data.shards import ShardWriter, iter_samples, list_shards  # noqa: E402
from imagebert_ds.data.toy import make_toy_data  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    make_toy_data(out, train=200, test=12, seed=0, shard_size=50)  # stage1: 4 shards, stage2: 2
    return out


def cfg_for(*paths, ratios=None, **kw) -> DataConfig:
    ratios = ratios or [1.0] * len(paths)
    args = dict(batch_size=10, max_regions=4, read_batch=16, num_threads=1, shuffle_buffer=32)
    args.update(kw)
    return from_dict(DataConfig, {"sources": [{"path": str(p), "ratio": r}
                                              for p, r in zip(paths, ratios)], **args})


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_two_ranks_disjoint_and_covering(toy):
    src = toy / "stage1_web"
    ids = []
    for rank in (0, 1):
        loader = build_pretrain_loader(cfg_for(src), rank, 2)
        # one epoch of this rank's part = 100 samples = 10 batches of 10
        got = torch.cat([b["image_ids"] for b in take(loader, 10)]).tolist()
        assert len(set(got)) == 100, "a rank repeated a sample within its epoch"
        assert loader.epoch == [pytest.approx(1.0)]
        ids.append(set(got))
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(range(1_000_000, 1_000_200))


def test_batch_contract(toy):
    b = next(build_pretrain_loader(cfg_for(toy / "stage2_clean"), 0, 1))
    assert b["input_ids"].shape[0] == 10 and b["region_feats"].shape == (10, 4, 2048)
    assert b["region_boxes"].shape == (10, 4, 5) and b["moc_labels"].shape == (10, 4)
    assert b["input_ids"][:, 0].eq(101).all()  # [CLS]
    assert b["attention_mask"].sum(1).max() == b["input_ids"].shape[1]  # padded to the longest


def test_resume_gives_identical_batches(toy):
    cfg = cfg_for(toy / "stage1_web", toy / "stage2_clean", ratios=[0.5, 0.5])
    loader = build_pretrain_loader(cfg, 1, 2)
    at_start = loader.state_dict()
    take(loader, 7)  # 70 samples: mid-way through DALI batches of 16, different per source
    state = loader.state_dict()
    assert state["samples_seen"] == 70 and state["batches"] == 7
    expected = take(loader, 6)  # crosses an epoch boundary of the stage2 part (50 samples)
    assert loader.epoch[1] > 1.0

    restored = build_pretrain_loader(cfg, 1, 2)
    restored.load_state_dict(state)
    assert restored.samples_seen == 70
    assert_same(take(restored, 6), expected)

    from_start = build_pretrain_loader(cfg, 1, 2)
    from_start.load_state_dict(at_start)
    assert_same(take(from_start, 13)[7:], expected)

    # the check can fail: without the restore the next batches differ
    fresh = build_pretrain_loader(cfg, 1, 2)
    take(fresh, 1)
    with pytest.raises(AssertionError):
        assert_same(take(fresh, 6), expected)


def test_state_from_other_rank_is_refused_and_close(toy):
    cfg = cfg_for(toy / "stage2_clean")
    state = build_pretrain_loader(cfg, 0, 2).state_dict()
    loader = build_pretrain_loader(cfg, 1, 2)
    with pytest.raises(ValueError, match="rank"):
        loader.load_state_dict(state)
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_mixing_ratio(toy):
    cfg = cfg_for(toy / "stage1_web", toy / "stage2_clean", ratios=[0.8, 0.2], batch_size=50)
    ids = torch.cat([b["image_ids"] for b in take(build_pretrain_loader(cfg, 0, 1), 8)])
    frac = (ids >= 2_000_000).float().mean().item()
    assert abs(frac - 0.2) < 0.06  # 400 draws: std 0.02


def test_empty_and_missing_sources(toy, tmp_path):
    with pytest.raises(ConfigError, match="sources is empty"):
        build_pretrain_loader(DataConfig(), 0, 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_pretrain_loader(cfg_for(tmp_path / "nope"), 0, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.tar shards"):
        build_pretrain_loader(cfg_for(tmp_path / "empty"), 0, 1)
    with pytest.raises(ConfigError, match="unknown key 'sources\\[0\\].ratoi'"):
        from_dict(DataConfig, {"sources": [{"path": "x", "ratoi": 1}]})


def _copy_without(src_tar, dst_tar, drop: dict[str, str]):
    """Copy a shard, dropping component drop[key] of the named samples."""
    with ShardWriter(dst_tar) as w:
        for key, comps in iter_samples(src_tar):
            w.write(key, {e: d for e, d in comps.items() if drop.get(key) != e})


def test_missing_component_policy(toy, tmp_path):
    src = list_shards(toy / "stage2_clean")[0]
    _copy_without(src, tmp_path / "d" / "shard-000000.tar",
                  {"002000003": "txt", "002000010": "roi.npy"})
    with pytest.raises(MissingComponentError, match="shard-000000.tar: sample '002000003' has no "
                                                    ".txt component \\(2 incomplete"):
        build_pretrain_loader(cfg_for(tmp_path / "d"), 0, 1)
    loader = build_pretrain_loader(cfg_for(tmp_path / "d", missing_component="skip"), 0, 1)
    assert loader.skipped == 2
    ids = torch.cat([b["image_ids"] for b in take(loader, 5)]).tolist()[:48]
    assert len(set(ids)) == 48 and not {2_000_003, 2_000_010} & set(ids)


def test_region_only_and_images(toy, tmp_path):
    # region-only data: no .jpg at all, use_images off
    src = list_shards(toy / "stage2_clean")[0]
    with ShardWriter(tmp_path / "r" / "shard-000000.tar") as w:
        for key, comps in iter_samples(src):
            comps.pop("jpg")
            w.write(key, comps)
    b = next(build_pretrain_loader(cfg_for(tmp_path / "r"), 0, 1))
    assert "pixel_values" not in b and b["region_feats"].shape == (10, 4, 2048)
    # pixels decoded on the CPU, resized and centre-cropped
    b = next(build_pretrain_loader(cfg_for(toy / "test", use_images=True, image_size=32), 0, 1))
    assert b["pixel_values"].shape == (10, 3, 32, 32) and b["pixel_values"].dtype == torch.float32


def test_retrieval_split(toy):
    split = load_retrieval_split(toy / "test", cfg_for(toy / "test", max_text_len=16))
    assert split.num_images == 12 and split.num_texts == 60
    assert split.text_to_image.tolist() == [i for i in range(12) for _ in range(5)]
    assert split.image_ids.tolist() == list(range(12))
    assert split.input_ids.shape[1] <= 16 and split.region_feats.shape == (12, 4, 2048)
    assert all(len(t) == 5 for t in split.image_to_texts())
    batch = split.pair_batch(torch.tensor([0, 3]), torch.tensor([7, 8]))
    assert batch["region_feats"].shape == (2, 4, 2048) and batch["input_ids"].shape[0] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (mixed image decoding)")
def test_gpu_image_decoding(toy):
    cfg = cfg_for(toy / "test", use_images=True, image_size=32)
    gpu = next(build_pretrain_loader(cfg, 0, 1, device="cuda:0"))
    cpu = next(build_pretrain_loader(cfg, 0, 1, device="cpu"))
    assert gpu["pixel_values"].device.type == "cpu" and gpu["pixel_values"].shape == (10, 3, 32, 32)
    assert torch.equal(gpu["image_ids"], cpu["image_ids"])
    # nvJPEG and the CPU decoder differ slightly (IDCT rounding, resize on another device)
    assert (gpu["pixel_values"] - cpu["pixel_values"]).abs().mean() < 0.1


def test_retrieval_split_pair_layout(toy, tmp_path):
    """One sample per image-caption pair (same image_id repeated) groups into image rows."""
    with ShardWriter(tmp_path / "pairs" / "shard-000000.tar") as w:
        for key, comps in iter_samples(list_shards(toy / "test")[0]):
            for j, cap in enumerate(comps["txt"].decode().split("\n")):
                w.write(f"{key}_{j}", dict(comps, txt=cap))
    cfg = cfg_for(toy / "test")
    a = load_retrieval_split(tmp_path / "pairs", cfg)
    b = load_retrieval_split(toy / "test", cfg)
    for k in ("image_ids", "text_to_image", "input_ids", "region_feats", "region_boxes"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_img2dataset_style_json(toy, tmp_path):
    """No image_id: img2dataset's numeric 'key' is used, else a stable hash of shard/key."""
    import json

    from imagebert_ds.data.shards import image_id_of
    from imagebert_ds.data.validate import validate

    with ShardWriter(tmp_path / "i2d" / "00000.tar") as w:
        for n, (key, comps) in enumerate(iter_samples(list_shards(toy / "test")[0])):
            meta = json.loads(comps["json"])
            i2d = {"key": f"{n:09d}", "url": f"http://x/{n}.jpg", "status": "success",
                   "width": meta["width"], "height": meta["height"]}
            w.write(f"{n:09d}", dict(comps, json=i2d))
    assert validate(tmp_path / "i2d").ok
    ids = torch.cat([b["image_ids"] for b in take(build_pretrain_loader(cfg_for(tmp_path / "i2d"),
                                                                       0, 1), 3)])
    assert set(ids.tolist()) <= set(range(12))
    a = image_id_of({}, "/data/00001.tar:5120:abc.txt")
    assert a == image_id_of({}, "/other/00001.tar:abc") != image_id_of({}, "/d/00002.tar:0:abc.txt")
    assert 0 <= a < 2**63


def _shard_features(path) -> dict[int, torch.Tensor]:
    """image_id -> the .roi.npy stored in the shards (read with plain tarfile + numpy)."""
    import json

    from imagebert_ds.data.shards import load_npy

    out = {}
    for shard in list_shards(path):
        for key, comps in iter_samples(shard):
            out[json.loads(comps["json"])["image_id"]] = torch.from_numpy(
                load_npy(comps["roi.npy"], key))
    return out


@pytest.mark.parametrize("prefetch", [0, 3])
def test_batches_spanning_dali_runs_hold_the_shard_bytes(toy, prefetch):
    """Region features come out of DALI's buffers as views and are copied once into the batch:
    with read_batch 3 < batch_size 10 every batch spans several DALI runs (the views of the
    earlier runs are copied out before DALI reuses its buffers) and each row must still equal
    the sample's .roi.npy byte for byte (float16: the shards' dtype)."""
    src = toy / "stage2_clean"
    stored = _shard_features(src)
    loader = build_pretrain_loader(cfg_for(src, read_batch=3, prefetch_batches=prefetch), 0, 1)
    for b in take(loader, 6):
        assert b["region_feats"].dtype == torch.float16
        for row, image_id in enumerate(b["image_ids"].tolist()):
            roi = stored[image_id]
            n = min(len(roi), 4)
            assert torch.equal(b["region_feats"][row, :n], roi[:n]), image_id
    loader.close()


def test_image_batches_spanning_dali_runs_hold_each_images_pixels(toy):
    """Decoded images too: with read_batch 3 < batch_size 10 a batch's earlier samples were
    decoded by earlier DALI runs, whose buffers the next run may reuse; every image's pixels must
    equal those of the same image in batches that fit in one run."""
    src = toy / "stage2_clean"
    pixels = {}
    for read_batch in (3, 16):
        loader = build_pretrain_loader(cfg_for(src, read_batch=read_batch, use_images=True,
                                               image_size=32, prefetch_batches=0), 0, 1)
        got = {}
        for b in take(loader, 6):
            for row, image_id in enumerate(b["image_ids"].tolist()):
                got[image_id] = b["pixel_values"][row]
        loader.close()
        pixels[read_batch] = got
    common = pixels[3].keys() & pixels[16].keys()
    assert len(common) >= 10, len(common)
    for image_id in common:
        assert torch.equal(pixels[3][image_id], pixels[16][image_id]), image_id


def test_prefetch_thread_gives_the_same_batches_and_state(toy):
    """The background collation thread changes no byte of any batch, and state_dict() is the
    position after the last batch handed out (not the producer's, which runs ahead)."""
    cfg = cfg_for(toy / "stage1_web", toy / "stage2_clean", ratios=[0.5, 0.5])
    sync = build_pretrain_loader(cfg_for(toy / "stage1_web", toy / "stage2_clean",
                                         ratios=[0.5, 0.5], prefetch_batches=0), 0, 2)
    ahead = build_pretrain_loader(cfg_for(toy / "stage1_web", toy / "stage2_clean",
                                          ratios=[0.5, 0.5], prefetch_batches=4), 0, 2)
    assert_same(take(ahead, 5), take(sync, 5))
    import time
    time.sleep(0.5)  # let the producer run ahead as far as it can
    state = ahead.state_dict()
    assert state == sync.state_dict() and state["batches"] == 5
    expected = take(sync, 4)
    restored = build_pretrain_loader(cfg, 0, 2)
    restored.load_state_dict(state)
    assert_same(take(restored, 4), expected)
    for loader in (sync, ahead, restored):
        loader.close()


def test_bad_sample_error_reaches_the_caller_with_its_key(toy, tmp_path):
    """A broken .roi.npy raises in the training thread (not a dead worker), naming shard and
    key; the batches before it are delivered."""
    src = list_shards(toy / "stage2_clean")[0]
    with ShardWriter(tmp_path / "bad" / "shard-000000.tar") as w:
        for key, comps in iter_samples(src):
            if key == "002000007":
                comps["roi.npy"] = comps["roi.npy"][:-64]  # truncated payload
            w.write(key, comps)
    loader = build_pretrain_loader(cfg_for(tmp_path / "bad", prefetch_batches=2,
                                           on_bad_sample="error"), 0, 1)
    with pytest.raises(ValueError, match=r"shard-000000\.tar.*002000007.*\.npy is truncated"):
        take(loader, 10)
    assert loader.state_dict()["batches"] < 10
    loader.close()


def test_pixelbert_resize_rule_pads_to_a_square(toy, tmp_path):
    """image_fit pad: shorter side S, longer at most S * 1333 / 800, aspect kept, zero padding to
    the square of that side -- the DALI loader and the retrieval split's PIL path agree."""
    from PIL import Image

    from imagebert_ds.data.config import padded_side
    from imagebert_ds.data.retrieval_split import decode_image

    src = list_shards(toy / "test")[0]
    with ShardWriter(tmp_path / "wide" / "shard-000000.tar") as w:
        for key, comps in iter_samples(src):
            import io
            img = Image.open(io.BytesIO(comps["jpg"])).convert("RGB").resize((128, 48))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=95)
            w.write(key, dict(comps, jpg=buf.getvalue()))
    side = padded_side(32)
    cfg = cfg_for(tmp_path / "wide", use_images=True, image_size=32, image_fit="pad")
    assert cfg.image_shape == (side, side) == (53, 53)
    b = next(build_pretrain_loader(cfg, 0, 1))
    px = b["pixel_values"]
    assert px.shape == (10, 3, 53, 53)
    # 128 x 48 -> longer side capped at 53 (not 32 / 48 * 128 = 85): 53 x 20 rows, then padding
    assert (px[:, :, 21:, :] == 0).all() and px[:, :, :19, :].abs().sum() > 0
    ref = decode_image(next(iter_samples(tmp_path / "wide" / "shard-000000.tar"))[1]["jpg"], 32,
                       "k", "pad")
    assert ref.shape == (3, 53, 53) and (ref[:, 21:, :] == 0).all()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_boxes_and_classes_of_batches_spanning_dali_runs(toy, prefetch):
    """The small region arrays come out of DALI batches that are run ahead (a thread runs and
    parses the next one while the current is handed out, copying them out of DALI's buffers,
    which are in use only until the next run): with read_batch 3 < batch_size 10 every row's
    boxes and class labels equal the sample's .box.npy / .cls.npy. (DALI reuses a buffer later
    than the next run here, so leaving out the copy does not fail this test.)"""
    import json

    from imagebert_ds.data.collator import box_features
    from imagebert_ds.data.shards import load_npy

    src = toy / "stage2_clean"
    stored = {}
    for shard in list_shards(src):
        for key, comps in iter_samples(shard):
            meta = json.loads(comps["json"])
            stored[meta["image_id"]] = (
                box_features(load_npy(comps["box.npy"], key), meta["width"], meta["height"]),
                load_npy(comps["cls.npy"], key))
    loader = build_pretrain_loader(cfg_for(src, read_batch=3, prefetch_batches=prefetch,
                                           region_mask_prob=1.0), 0, 1)
    for b in take(loader, 8):
        for row, image_id in enumerate(b["image_ids"].tolist()):
            boxes, cls = stored[image_id]
            n = min(len(boxes), 4)
            assert torch.equal(b["region_boxes"][row, :n], torch.from_numpy(boxes[:n])), image_id
            assert b["moc_labels"][row, :n].tolist() == cls[:n].tolist(), image_id
    loader.close()
