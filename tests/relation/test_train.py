"""The trainer with the ``cluster`` objective: re-clustering state restored exactly on resume.

One rank (a world of one, DeepSpeed on the CPU) on the toy data: a run of 8 steps that
re-clusters every 3 steps is resumed from its step-4 checkpoint, and steps 5-8 — losses and the
re-clustering at step 6 (sizes, NMI to the step-3 clusters, kept fraction) — must equal the
uninterrupted run's bit for bit. Without the restored state the resumed run has no clusters at
step 4 and stops (``batch_inputs`` before any ``recluster``), and with lost assignments the
step-6 record would lack ``cluster/nmi_prev``. A checkpoint in the layout written before stage
hooks (the state under the rank state's ``"cluster"`` key) resumes the same."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
             PYTHONUNBUFFERED="1")
    e.pop("CUDA_VISIBLE_DEVICES", None)
    e.pop("TRITON_INTERPRET", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def _train(data: Path, out: Path, *extra: str):
    sets = [f"run.out_dir={out}", f"stages.0.sources.0.path={data / 'stage2_clean'}",
            f"stages.0.sources.1.path={data / 'relation_train'}", "probe.train=null",
            "probe.test=null", "stages.0.steps=8", "stages.0.warmup_steps=2",
            "stages.0.objectives.cluster.recluster_every=3",
            "stages.0.objectives.cluster.sample_size=32", "checkpoint.every_steps=4",
            "checkpoint.keep_last=3", "log.every_steps=1", "log.progress=false",
            "data.batch_size=8", "wandb.mode=disabled", *extra]
    args = [sys.executable, "-m", "imagebert_ds.train", "--config", "configs/runs/itr_toy.yaml"]
    for s in sets:
        args += ["--set", s]
    p = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _records(out: Path) -> list[dict]:
    keep = ("loss", "loss/mlm", "loss/itm", "loss/itc", "loss/cluster")
    return [{k: v for k, v in r.items() if k in keep or k.startswith("cluster/") or k == "step"}
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_reclustering_restored_exactly_on_resume(tmp_path):
    from imagebert_ds.data.toy import make_toy_data

    data = tmp_path / "data"
    make_toy_data(data, train=64, test=4, seed=1, relation_train=64)
    out = tmp_path / "run"
    _train(data, out)
    full = _records(out)
    assert [r["step"] for r in full] == list(range(1, 9))
    assert full[3]["cluster/step"] == 3 and full[6]["cluster/step"] == 6  # merged into step 4 / 7
    assert "cluster/nmi_prev" in full[6]

    ck = out / "relation" / "checkpoints"
    assert (ck / "step00000004" / "COMPLETE").is_file()
    _rewind(out)
    _train(data, out, "run.resume=auto")
    assert _records(out) == full

    # the same checkpoint in the layout of before stage hooks
    path = ck / "step00000004" / "rank_state_00000.pt"
    state = torch.load(path, weights_only=False)
    state["cluster"] = state.pop("hooks")["cluster"]
    torch.save(state, path)
    _rewind(out)
    _train(data, out, "run.resume=auto")
    assert _records(out) == full


def _rewind(out: Path) -> None:
    """Back to the step-4 checkpoint: as if the run had stopped there."""
    ck = out / "relation" / "checkpoints"
    (ck / "latest").write_text("step00000004")
    shutil.rmtree(ck / "step00000008")
    shutil.rmtree(out / "relation" / "final")
