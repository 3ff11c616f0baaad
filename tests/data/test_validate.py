"""``validate`` finds exactly the planted bad samples and writes a clean copy."""
from __future__ import annotations

import numpy as np

from imagebert_ds.cli import main
from imagebert_ds.data.shards import ShardWriter, iter_samples, list_shards, load_npy
from imagebert_ds.data.toy import make_toy_data
from imagebert_ds.data.validate import validate


def _plant(src_dir, dst_tar):
    """Copy a toy shard, planting one bad sample of each kind; returns {key: problem}."""
    planted = {}
    with ShardWriter(dst_tar) as w:
        for i, (key, comps) in enumerate(iter_samples(list_shards(src_dir)[0])):
            comps = dict(comps)
            if i == 2:
                comps["jpg"] = comps["jpg"][: len(comps["jpg"]) // 2]
                planted[key] = "does not decode"
            elif i == 5:
                comps["jpg"] = b"<!DOCTYPE html><html><body>404 Not Found</body></html>"
                planted[key] = "HTML"
            elif i == 7:
                del comps["txt"]
                planted[key] = "missing caption"
            elif i == 9:
                r = len(load_npy(comps["roi.npy"], key))
                comps["roi.npy"] = np.zeros((r, 1024), np.float16)
                planted[key] = "wrong feature shape"
            w.write(key, comps)
    return planted


def test_validate_finds_planted(tmp_path, capsys):
    make_toy_data(tmp_path / "toy", train=4, test=12, seed=1)
    planted = _plant(tmp_path / "toy" / "test", tmp_path / "bad" / "shard-000000.tar")
    rep = validate(tmp_path / "bad")
    assert rep.samples == 12
    found: dict[str, list[str]] = {}
    for _, k, p in rep.bad:
        found.setdefault(k, []).append(p)
    assert set(found) == set(planted)
    for key, word in planted.items():
        assert len(found[key]) == 1 and word in found[key][0], (key, found[key])

    assert main(["validate", str(tmp_path / "bad"), "--clean-out", str(tmp_path / "clean")]) == 1
    out = capsys.readouterr().out
    assert "checked 12 samples in 1 shards: 4 bad" in out
    assert f"{next(iter(planted))}: image does not decode" in out
    clean = [k for k, _ in iter_samples(tmp_path / "clean" / "shard-000000.tar")]
    assert len(clean) == 8 and not set(clean) & set(planted)
    assert (tmp_path / "clean" / "shard-000000.idx").exists()
    assert main(["validate", str(tmp_path / "clean")]) == 0
    assert main(["validate", str(tmp_path / "toy")]) == 0  # all toy splits are clean


def test_validate_missing_dir(tmp_path):
    assert main(["validate", str(tmp_path / "nope")]) != 0
