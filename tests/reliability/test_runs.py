"""Real training runs (one CPU rank, the tiny model, a handful of steps) for what the trainer
guarantees after a failure: bad steps never reach the weights and stop the run; a resume falls
back past broken checkpoints and continues bit for bit; bad samples are skipped identically;
the per-step losses of a short toy run match the golden file in tests/assets/."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from rel_helpers import REPO, cli, env, losses, metrics, run_config

pytestmark = pytest.mark.slow
GOLDEN = REPO / "tests" / "assets" / "golden_losses_reliability.json"


def train(cfg, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(cli("pretrain", "--config", str(cfg), *extra), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def base(bad_source, tmp_path_factory):
    """6 steps over the source with broken samples, 2 micro-batches a step, a checkpoint every
    2 steps (all kept)."""
    tmp = tmp_path_factory.mktemp("rel_base")
    out = tmp / "run"
    cfg = run_config(tmp, bad_source[0], out, deepspeed__gradient_accumulation_steps=2)
    p = train(cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    return cfg, out


def test_losses_match_the_golden_file(base):
    """CI's regression check of data order, masking, skips and the update (rtol: BLAS builds
    differ in the last bits; a real change moves losses by far more)."""
    got = losses(base[1])
    if os.environ.get("IMAGEBERT_UPDATE_GOLDEN") == "1":  # after an intended change
        GOLDEN.parent.mkdir(exist_ok=True)
        rows = ",\n".join("  " + json.dumps(list(r)) for r in got)
        GOLDEN.write_text('{"about": "tests/reliability/test_runs.py::base, 6 steps on 1 CPU rank: '
                          '[step, loss, loss/mlm, loss/mrfr, loss/itm]",\n "losses": [\n'
                          f"{rows}\n ]}}\n")
    want = [tuple(r) for r in json.loads(GOLDEN.read_text())["losses"]]
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want):
        assert g[1:] == pytest.approx(w[1:], rel=1e-4), (g, w)


def test_bad_samples_are_counted_and_listed(base, bad_source):
    _, out = base
    recs = metrics(out)
    counts = [r["data/bad_samples"] for r in recs]
    assert counts == sorted(counts) and counts[-1] > 0
    listed = [json.loads(ln) for ln in
              (out / "s1" / "bad_samples" / "rank00000.jsonl").read_text().splitlines()]
    assert {r["key"] for r in listed} <= set(bad_source[1])
    assert all(r["shard"].endswith(".tar") and r["reason"] for r in listed)
    assert (out / "s1" / "final" / "COMPLETE").is_file() and not (out / "run.lock").exists()


def test_resume_falls_back_past_broken_checkpoints_bit_exact(base, tmp_path):
    """The newest checkpoint lost its COMPLETE marker (``latest`` still names it), the one
    before has a truncated model file: --resume reports both by file, continues from step 2
    (two micro-batches a step), truncates metrics.jsonl there, and repeats the uninterrupted
    run's losses, skips and final weights exactly."""
    cfg, out, ck, src_out = unfinished_copy(base, tmp_path)
    (ck / "step00000006" / "COMPLETE").unlink()
    model = ck / "step00000004" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:4096])
    p = train(cfg, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "latest names step00000006, which has no COMPLETE marker" in log
    assert f"{model} is truncated or corrupt" in log
    assert "resumed stage s1 at step 2" in log
    assert losses(out) == losses(src_out)  # bit for bit, each step once
    from safetensors.torch import load_file

    w_resumed, w_base = (load_file(o / "s1" / "final" / "model.safetensors") for o in (out, src_out))
    assert w_resumed.keys() == w_base.keys()
    assert all(torch.equal(w_resumed[k], w_base[k]) for k in w_base)  # the same weights, exactly
    bad = "s1/bad_samples/rank00000.jsonl"
    assert (out / bad).read_text() == (src_out / bad).read_text()
    assert (ck / "step00000004.unloadable").is_dir() and (out / "s1" / "final" / "COMPLETE").is_file()


def test_resume_check_fails_when_the_loader_position_is_not_restored(base, tmp_path):
    """The bit-exact comparison above is not vacuous: the same resume from step 2 with the
    loader's position left unrestored (fault injection, ``IMAGEBERT_FAULTS``) replays other
    samples, and the losses after step 2 differ from the uninterrupted run's."""
    cfg, out, ck, src_out = unfinished_copy(base, tmp_path)
    for tag in ("step00000004", "step00000006"):
        shutil.rmtree(ck / tag)
    (ck / "latest").write_text("step00000002")
    p = subprocess.run(cli("pretrain", "--config", str(cfg), "--resume"), cwd=REPO,
                       env=dict(env(), IMAGEBERT_FAULTS="no_loader_restore"), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "fault no_loader_restore" in p.stderr and "resumed stage s1 at step 2" in p.stderr
    got, want = losses(out), losses(src_out)
    assert got[:2] == want[:2] and [g[0] for g in got] == [w[0] for w in want]
    assert all(g != w for g, w in zip(got[2:], want[2:])), (got, want)


def unfinished_copy(base, tmp_path):
    """A copy of the base run without its export: (config, out_dir, checkpoint dir, base out)."""
    cfg, src_out = base
    out = tmp_path / "run"
    shutil.copytree(src_out, out)
    cfg = run_config(tmp_path, bad_src(cfg), out, deepspeed__gradient_accumulation_steps=2)
    shutil.rmtree(out / "s1" / "final")
    return cfg, out, out / "s1" / "checkpoints", src_out


def bad_src(cfg) -> str:
    import yaml

    return yaml.safe_load(cfg.read_text())["stages"][0]["sources"][0]["path"]


def test_bad_steps_never_touch_the_weights_and_stop_the_run(toy_source, tmp_path):
    """fp32 at ZeRO 0 (where DeepSpeed checks nothing), every loss +inf (an MLM weight past
    float32): steps 1-2 are skipped by the guarded optimizer — the checkpoint of step 2 holds
    exactly the initial weights — and the third bad step in a row stops the run naming stage,
    step and task losses; exit code 1, no export. (ZeRO-2's own skip: tests/train/test_dist.py.)"""
    from imagebert_ds.model import ImageBERTForPretraining
    from imagebert_ds.train.config import load_run_config
    from imagebert_ds.train.trainer import param_checksum

    out = tmp_path / "run"
    cfg = run_config(tmp_path, toy_source, out, training={"max_bad_steps": 3})
    p = train(cfg, "--set", "stages.0.objectives.mlm=1e39")
    assert p.returncode == 1, p.stderr[-3000:]
    assert "training stopped: stage s1 step 3: non-finite loss; 3 bad step(s) in a row " \
           "(training.max_bad_steps=3); task losses {loss: inf, loss/mlm: " in p.stderr
    assert "the last complete checkpoint is " in p.stderr
    assert not (out / "s1" / "final").exists()
    recs = metrics(out)
    assert [r["skipped_steps"] for r in recs] == [1, 2] and recs[-1]["bad_steps"] == 2
    rc = load_run_config(cfg)
    model = ImageBERTForPretraining(rc.model_config(rc.stages[0]))
    sd = torch.load(out / "s1" / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt",
                    weights_only=False)["module"]
    model.load_state_dict(sd)
    assert param_checksum(model) == recs[0]["init/param_checksum"]
