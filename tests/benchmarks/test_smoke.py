"""Every benchmark runs at smoke size and writes a well-formed result (JSON + plot); the report
renders them. Contract only: keys present, values positive and consistent — no timing asserts
(timings belong in the benchmarks themselves)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


def _cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "bench_cache"


# script -> extra arguments (smaller data where the smoke size is more than CI needs); each runs
# in 4-25 s on 2 CPU cores, about 85 s in all
SMOKE = {
    "bench_loader.py": ["--per-shard", "128", "--images", "128", "--warmup", "2", "--windows",
                        "2", "--per-window", "2", "--drain", "2", "--image-sizes", "224"],
    "bench_train.py": ["--trainer-steps", "8", "--trainer-warmup", "2"],
    "scaling_model.py": [],
    "bench_attention.py": [],
    "bench_layernorm.py": [],
    "bench_mlm_loss.py": [],
    "bench_eval.py": [],
}
NEEDS_DATA = {"bench_loader.py", "bench_train.py"}


def run_smoke(script: str, out: Path, cache: Path) -> dict:
    """Run ``script --smoke`` into ``out``; its one results JSON, with the plot checked."""
    args = [sys.executable, str(BENCH / script), "--smoke", "--out-dir", str(out), *SMOKE[script]]
    if script in NEEDS_DATA:
        args += ["--data", str(cache)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    found = sorted(out.glob("*.json"))
    assert len(found) == 1, found
    assert found[0].with_suffix(".png").stat().st_size > 1000, "plot missing or empty"
    data = json.loads(found[0].read_text())
    for key in ("benchmark", "mode", "device", "date", "commit", "versions", "argv"):
        assert key in data["meta"], key
    assert data["rows"], "no rows"
    return data


def positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def check_loader(data: dict) -> None:
    rows = {r["row"]: r for r in data["rows"]}
    assert {"raw_read", "ours_regions", "baseline_regions", "raw_read_images", "ours_images_224",
            "baseline_images_224"} <= set(rows)
    for name, r in rows.items():
        assert positive(r["samples_per_s"]) and positive(r["mb_per_s"]), name
        assert r["threads"] == 2 and r["batch"] == 64
        if name.startswith("raw_read"):
            assert r["ratio_to_raw"] is None
        else:
            assert positive(r["ratio_to_raw"]) and positive(r["ratio_to_baseline"]), name
    assert rows["baseline_regions"]["ratio_to_baseline"] == pytest.approx(1.0)
    meta = data["meta"]
    assert meta["shapes"]["regions"] == 100 and meta["shapes"]["feat_dim"] == 2048
    assert meta["threads"]["dali_threads"] == meta["threads"]["dataloader_workers"] == 2
    assert len(meta["loadavg_start"]) == 3
    assert meta["target_ours_regions_ratio_to_raw"]["got"] == rows["ours_regions"]["ratio_to_raw"]


def check_train(data: dict) -> None:
    rows = {r["backend"]: r for r in data["rows"]}
    assert {"eager", "sdpa", "hf_eager_baseline", "trainer", "pixel_32"} <= set(rows)
    for name, r in rows.items():
        keys = ("step_ms", "samples_per_s", "tokens_per_s", "tflops")
        for key in keys + (() if name.startswith("pixel_") else ("speedup_vs_hf",)):
            assert positive(r[key]), (name, key)
    # Pixel-BERT row: the tiny trunk on images padded to the pad rule's square (32 -> 53 px)
    px = rows["pixel_32"]
    assert px["image_side"] == 53 and px["backbone"] == "resnet18" and px["speedup_vs_hf"] is None
    assert rows["hf_eager_baseline"]["speedup_vs_hf"] == pytest.approx(1.0)
    tr = rows["trainer"]
    assert 0.0 <= tr["data_wait_frac"] <= 1.0
    assert tr["steps_measured"] == 6 and tr["zero_stage"] == 2
    assert data["meta"]["shapes"]["objectives"] == ["mlm", "moc", "mrfr", "itm"]


def check_scaling(data: dict) -> None:
    rows = data["rows"]
    for zs in (2, 3):
        rs = [r for r in rows if r["zero_stage"] == zs]
        assert [r["nodes"] for r in rs] == [1, 2, 4, 8, 16, 32, 64]
        assert rs[0]["efficiency_vs_1node"] == pytest.approx(1.0)
        effs = [r["efficiency_vs_1gpu"] for r in rs]
        assert all(0 < e <= 1 for e in effs)
        assert effs == sorted(effs, reverse=True), "more nodes cannot communicate less"
    zero2 = {r["nodes"]: r["comm_ms"] for r in rows if r["zero_stage"] == 2}
    zero3 = {r["nodes"]: r["comm_ms"] for r in rows if r["zero_stage"] == 3}
    assert all(zero3[n] == pytest.approx(1.5 * zero2[n]) for n in zero2)  # 3 Psi vs 2 Psi
    ref = data["meta"]["reference"]
    assert ref["published_efficiency_32_nodes"] == pytest.approx(0.949, abs=1e-3)
    assert 0 < ref["model_efficiency_32_nodes"] <= 1
    assert data["meta"]["params"] > 100e6  # BERT-base + region embeddings + heads


def check_kernels(data: dict) -> None:
    assert any(positive(r.get("fwd_bwd_ms")) for r in data["rows"])


def check_eval(data: dict) -> None:
    rows = {r["mode"].split(" ")[0]: r for r in data["rows"]}
    assert {"cross-encoder", "full", "two-stage"} <= set(rows)
    assert all(positive(r["seconds"]) and positive(r["pairs_per_s"]) for r in rows.values())
    assert positive(data["meta"]["ratio_full_over_two_stage"])


CHECKS = {"bench_loader.py": check_loader, "bench_train.py": check_train,
          "scaling_model.py": check_scaling, "bench_eval.py": check_eval}


@pytest.mark.parametrize("script", list(SMOKE))
def test_benchmark_smoke(script, tmp_path, tmp_path_factory):
    data = run_smoke(script, tmp_path, _cache(tmp_path_factory))
    CHECKS.get(script, check_kernels)(data)


def test_report_renders_every_result(tmp_path, tmp_path_factory):
    sys.path.insert(0, str(BENCH))
    import report

    run_smoke("scaling_model.py", tmp_path, _cache(tmp_path_factory))
    (tmp_path / "junk.json").write_text("{}")  # not a results file: skipped, not fatal
    text = report.render(tmp_path)
    assert "## Weak-scaling model (`scaling_model.py`)" in text
    assert "| zero_stage | nodes |" in text and "94.9%" in text
    assert "(results/scaling-" in text and ".png)" in text
