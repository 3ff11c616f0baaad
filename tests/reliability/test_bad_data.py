"""Bad data never kills a run (``data.on_bad_sample: skip``), is named when asked to stop
(``error``), and is skipped identically after a resume; broken shards and indices."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI (nvidia-dali-cuda120) is not installed")

from imagebert_ds.config_utils import ConfigError, from_dict  # noqa: E402
from imagebert_ds.data import DataConfig, build_pretrain_loader  # noqa: E402
from imagebert_ds.data.shards import (BadSampleError, ensure_index, index_path_for,  # noqa: E402
                                      iter_samples, read_index)
from imagebert_ds.data.validate import validate  # noqa: E402


def cfg_for(path, **kw) -> DataConfig:
    args = dict(batch_size=4, max_regions=4, read_batch=8, num_threads=1, shuffle_buffer=16,
                prefetch_batches=1)
    args.update(kw)
    return from_dict(DataConfig, {"sources": [{"path": str(path)}], **args})


def image_ids_of(src, keys) -> set[int]:
    out = set()
    for shard in src.glob("shard-0*.tar"):
        for key, comps in iter_samples(shard):
            if key in keys:
                out.add(json.loads(comps["json"])["image_id"])
    return out


def lines(path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_bad_samples_are_skipped_counted_listed_and_identical_on_resume(bad_source, tmp_path):
    src, broken = bad_source
    a = build_pretrain_loader(cfg_for(src), 0, 1)
    a.open_bad_sample_log(tmp_path / "a.jsonl")
    first = [next(a) for _ in range(6)]
    state = a.state_dict()
    rest = [next(a) for _ in range(24)]  # 120 samples: more than one pass over the 96 usable
    bad_ids = image_ids_of(src, broken)
    seen = torch.cat([b["image_ids"] for b in first + rest]).tolist()
    assert not bad_ids & set(seen) and all(torch.isfinite(b["region_feats"]).all() for b in rest)
    log_a = [r for r in lines(tmp_path / "a.jsonl") if r["batch"] <= 30]
    assert a.bad_samples == len(log_a) >= len(broken)
    for r in log_a:  # every skip names its shard, key and why
        assert r["key"] in broken and broken[r["key"]] in r["reason"], r
        assert r["shard"].endswith(("shard-000000.tar", "shard-trunc.tar"))
    assert {r["key"] for r in log_a} == set(broken)
    # resume at batch 6: the same batches, the same skips, the log continued (not duplicated)
    shutil.copy(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    b = build_pretrain_loader(cfg_for(src), 0, 1)
    b.load_state_dict(state)
    b.open_bad_sample_log(tmp_path / "b.jsonl")  # after the state, as the trainer does
    resumed = [next(b) for _ in range(24)]
    for x, y in zip(rest, resumed):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert [r for r in lines(tmp_path / "b.jsonl") if r["batch"] <= 30] == log_a
    assert b.bad_samples == a.bad_samples
    # the check can fail: without restoring the loader state the batches differ
    c = build_pretrain_loader(cfg_for(src), 0, 1)
    unrestored = [next(c) for _ in range(24)]
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(rest, unrestored))
    for loader in (a, b, c):
        loader.close()


def test_on_bad_sample_error_names_shard_and_key(bad_source, tmp_path):
    src, broken = bad_source
    # the empty tar and the truncated one are refused at once, by name
    with pytest.raises(BadSampleError, match=r"shard-empty\.tar: empty webdataset shard"):
        build_pretrain_loader(cfg_for(src, on_bad_sample="error"), 0, 1)
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(src / "shard-trunc.tar", only)
    with pytest.raises(BadSampleError, match=r"shard-trunc\.tar: truncated or corrupt tar"):
        build_pretrain_loader(cfg_for(only, on_bad_sample="error"), 0, 1)
    shutil.copy(src / "shard-000000.tar", only)
    (only / "shard-trunc.tar").unlink()
    loader = build_pretrain_loader(cfg_for(only, on_bad_sample="error", prefetch_batches=0), 0, 1)
    with pytest.raises(BadSampleError) as e:
        for _ in range(40):
            next(loader)
    msg = str(e.value)
    key = msg.split("sample '")[1].split("'")[0]
    assert "shard-000000.tar: sample '" in msg and broken[key] in msg, msg
    loader.close()


def test_stale_index_is_rebuilt(toy_source, tmp_path, caplog):
    """An index newer than its tar but written for other contents (a shard replaced with its
    mtime kept, cut short): rebuilt from the tar instead of misleading DALI."""
    shard = sorted(toy_source.glob("*.tar"))[0]
    tar = tmp_path / "shard-000000.tar"
    data = shard.read_bytes()
    tar.write_bytes(data)
    idx, entries = ensure_index(tar)
    tar.write_bytes(data[: len(data) * 2 // 3])  # cut short ...
    st = idx.stat()
    os.utime(tar, (st.st_atime - 10, st.st_mtime - 10))  # ... but older than its index
    idx2, short = ensure_index(tar, "skip")
    assert idx2 == index_path_for(tar) and 0 < len(short) < len(entries)
    assert len(read_index(idx2)) == len(short)
    assert "index does not match the shard" in caplog.text


def test_validate_flags_empty_and_truncated_shards(bad_source):
    src, _ = bad_source
    rep = validate(src, feat_dim=2048)
    problems = {(os.path.basename(s), p.split(" (")[0]) for s, k, p in rep.bad if k == "-"}
    assert ("shard-empty.tar", "empty shard") in problems
    assert any(s == "shard-trunc.tar" and p.startswith("truncated tar") for s, p in problems)
    assert not rep.ok


def test_resume_onto_the_clean_copy(bad_source, tmp_path):
    """validate --clean-out writes the good samples elsewhere: a saved loader position does not
    apply there (refused, naming data.resume_data); with data.resume_data=restart the stage goes
    on from a fresh shuffle, counters kept."""
    src, broken = bad_source
    a = build_pretrain_loader(cfg_for(src), 0, 1)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    a.close()
    clean = tmp_path / "clean"
    validate(src, feat_dim=2048, clean_out=clean)
    b = build_pretrain_loader(cfg_for(clean), 0, 1)
    with pytest.raises(ConfigError, match="data.resume_data=restart"):
        b.load_state_dict(state)
    c = build_pretrain_loader(cfg_for(clean, resume_data="restart"), 0, 1)
    c.load_state_dict(state)
    assert c.state_dict()["batches"] == 3
    batch = next(c)
    assert not image_ids_of(src, broken) & set(batch["image_ids"].tolist())
    for loader in (b, c):
        loader.close()


def test_mid_epoch_resume_neither_skips_nor_repeats(toy_source):
    """64 samples, 4 a batch: stop after 10 batches, resume, finish the epoch and run into the
    next one — every sample exactly once per epoch, across the resume and the boundary."""
    a = build_pretrain_loader(cfg_for(toy_source), 0, 1)
    before = [next(a)["image_ids"] for _ in range(10)]
    state = a.state_dict()
    a.close()
    b = build_pretrain_loader(cfg_for(toy_source), 0, 1)
    b.load_state_dict(state)
    after = [next(b)["image_ids"] for _ in range(14)]
    epoch1 = torch.cat(before + after[:6]).tolist()
    epoch2 = torch.cat(after[6:]).tolist()
    assert len(epoch1) == len(set(epoch1)) == 64 and b.epoch[0] == pytest.approx(1.5)
    assert len(set(epoch2)) == len(epoch2) == 32 and set(epoch2) <= set(epoch1)
    b.close()


def test_undecodable_image_is_named_by_shard_and_key(toy_source, tmp_path):
    """An HTML page saved as .jpg: DALI's decoder fails its whole batch without saying which
    sample; the loader re-reads that batch undecoded and names shard and key."""
    from imagebert_ds.data.shards import ShardWriter

    src = sorted(toy_source.glob("*.tar"))[0]
    with ShardWriter(tmp_path / "img" / "shard-000000.tar") as w:
        for i, (key, comps) in enumerate(iter_samples(src)):
            if i == 6:
                comps["jpg"] = b"<!doctype html><html>404</html>"
                bad = key
            w.write(key, comps)
    loader = build_pretrain_loader(cfg_for(tmp_path / "img", use_images=True, image_size=32,
                                           prefetch_batches=0), 0, 1)
    with pytest.raises(BadSampleError, match=rf"shard-000000\.tar: sample '{bad}': not an image "
                                             r"\(\.jpg holds HTML"):
        for _ in range(20):
            next(loader)
    loader.close()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_all_finite_matches_numpy(dtype):
    """The float16 bit test against np.isfinite: every non-finite kind, anywhere, both signs."""
    from imagebert_ds.data.decode import _CHUNK, all_finite

    a = np.random.default_rng(0).standard_normal(2 * _CHUNK + 7).astype(dtype)
    assert all_finite(a) and all_finite(np.array([], dtype))
    for v in (np.inf, -np.inf, np.nan, -np.nan):
        for i in (0, _CHUNK - 1, _CHUNK, len(a) - 1):
            b = a.copy()
            b[i] = v
            assert not all_finite(b) and not np.isfinite(b).all()
    big = np.array([65504.0, -65504.0], dtype)  # float16's largest finite values
    assert all_finite(big)


def test_rows_with_nonfinite_features_are_replaced_by_copies_of_good_rows(bad_source, tmp_path):
    """NaN features show only as the collator copies them, after the batch was formed: such a
    row becomes a copy of the next good row in every key (no new sample is drawn, so later
    batches do not depend on it), it is counted and listed, and ``on_bad_sample: error``
    names the shard and key instead."""
    src, broken = bad_source
    nan_key = next(k for k, why in broken.items() if "non-finite" in why)
    loader = build_pretrain_loader(cfg_for(src, batch_size=8, prefetch_batches=0), 0, 1)
    loader.open_bad_sample_log(tmp_path / "bad.jsonl")
    repaired = 0
    for _ in range(60):  # ~5 passes over the usable samples: the NaN sample ~5 times
        before = loader._repaired
        b = next(loader)
        assert torch.isfinite(b["region_feats"]).all()
        if loader._repaired > before:
            repaired += 1
            rows = [r for r in lines(tmp_path / "bad.jsonl") if r["batch"] == loader.batches
                    and "non-finite" in r["reason"]]
            assert [r["key"] for r in rows] == [nan_key]
            i, g = (int(n) for n in re.findall(r"row (\d+)", rows[0]["reason"]))
            assert i != g and all(torch.equal(b[k][i], b[k][g]) for k in b)
    assert repaired >= 3 and loader.bad_samples >= repaired
    assert not image_ids_of(src, {nan_key}) & set(b["image_ids"].tolist())
    loader.close()
    only = tmp_path / "only"  # the shard with the broken samples, without the broken shards
    only.mkdir()
    shutil.copy(src / "shard-000000.tar", only)
    strict = build_pretrain_loader(cfg_for(only, batch_size=8, prefetch_batches=0,
                                           on_bad_sample="error"), 0, 1)
    with pytest.raises(BadSampleError, match=f"sample '{nan_key}': non-finite region features"):
        for _ in range(60):
            try:
                next(strict)
            except BadSampleError as e:
                if "non-finite" not in str(e):  # another broken sample first: go on
                    continue
                raise
    strict.close()
