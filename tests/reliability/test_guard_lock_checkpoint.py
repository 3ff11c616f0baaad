"""In-process pieces of the reliability guarantees: the step guard, the run lock, checkpoint
fallback and the config holes (the real-process runs are in test_runs.py / test_orphans.py)."""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imagebert_ds.config_utils import ConfigError
from imagebert_ds.run.checkpoint import CheckpointManager
from imagebert_ds.run.layout import COMPLETE
from imagebert_ds.train.guard import (StepGuard, TrainingError, check_finite_weights,
                                      skip_nonfinite_updates)
from imagebert_ds.runtime.lock import RunLock, RunLockedError


# ---- step guard ------------------------------------------------------------------------------
def test_fp32_zero0_optimizer_skips_nonfinite_updates():
    """The check DeepSpeed lacks at ZeRO 0 in fp32: a NaN gradient leaves weights and AdamW
    state untouched and sets ``overflow`` (what the engine reads); finite ones update. Also
    under torch's LR scheduler, which wraps ``step`` through its ``__func__``."""
    model = torch.nn.Linear(3, 2)
    opt = skip_nonfinite_updates(torch.optim.AdamW(model.parameters(), lr=0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    model.bias.grad[0] = float("nan")
    opt.step()
    assert opt.overflow and not opt.state
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    assert not opt.overflow
    assert not torch.equal(before[0], model.weight)


def test_step_guard_counts_bad_steps_in_a_row(tmp_path):
    g = StepGuard("s1", 3, tmp_path)
    losses = lambda: {"loss": float("inf"), "loss/mlm": 2.5}  # noqa: E731
    for step, (bad_loss, applied) in enumerate([(True, False), (False, False), (False, True),
                                                (True, True), (False, False)], start=1):
        g.update(step, bad_loss, applied, losses)
    assert g.consecutive == 2 and g.total == 4
    with pytest.raises(TrainingError) as e:
        g.update(6, False, False, losses)
    msg = str(e.value)
    assert "stage s1 step 6: non-finite gradient norm" in msg and "3 bad step(s) in a row" in msg
    assert "training.max_bad_steps=3" in msg and "loss/mlm: 2.5" in msg
    assert "no checkpoint of stage s1 was written yet" in msg


def test_export_refuses_nonfinite_weights():
    sd = {"a": torch.zeros(2), "b.weight": torch.tensor([1.0, float("nan")]),
          "ids": torch.arange(3)}
    with pytest.raises(TrainingError, match="export of x: weight 'b.weight' is not finite"):
        check_finite_weights(sd, "export of x")
    check_finite_weights({"a": torch.zeros(2)}, "fine")


# ---- run lock --------------------------------------------------------------------------------
def test_second_run_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunLockedError) as e:
        RunLock(tmp_path).acquire()
    msg = str(e.value)
    assert f"pid {first.me['pid']} on host {socket.gethostname()}" in msg and "run.lock" in msg
    with pytest.raises(RunLockedError):
        RunLock(tmp_path).check()
    first.release()
    assert not (tmp_path / "run.lock").exists()
    RunLock(tmp_path).check()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(
        f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}, "since": "then"}}')
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING, "imagebert_ds.train"):
        lock.acquire()
    assert f"stale lock {tmp_path / 'run.lock'} of pid {dead.pid}" in caplog.text
    assert lock.holder()["pid"] == lock.me["pid"]
    lock.release()
    # another host's lock cannot be checked from here: refused, with how to clear it
    (tmp_path / "run.lock").write_text('{"host": "elsewhere", "pid": 1, "since": "then"}')
    with pytest.raises(RunLockedError, match="if that run is gone, delete"):
        RunLock(tmp_path).acquire()


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    """Slurm runs one attempt of a job at a time: a requeued job, on another node, takes over
    the lock of its earlier attempt; another job's lock is refused."""
    (tmp_path / "run.lock").write_text('{"host": "node7", "pid": 1, "slurm_job": "42"}')
    monkeypatch.setenv("SLURM_JOB_ID", "43")
    with pytest.raises(RunLockedError, match="pid 1 on host node7"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.holder()["pid"] == lock.me["pid"]
    lock.release()


# ---- checkpoint fallback (the engine stands in for DeepSpeed's load) ------------------------
class FakeEngine:
    def __init__(self):
        self.loaded = []

    def load_checkpoint(self, directory, tag):
        torch.load(Path(directory) / tag / "mp_rank_00_model_states.pt", weights_only=False)
        self.loaded.append(tag)
        return directory, {"step": int(tag[4:])}


def make_ckpts(d: Path, steps=(2, 4, 6), world=1) -> CheckpointManager:
    for s in steps:
        t = d / f"step{s:08d}"
        t.mkdir(parents=True)
        torch.save({"w": torch.full((64,), float(s))}, t / "mp_rank_00_model_states.pt")
        torch.save({"loader": s, "world_size": world}, t / "rank_state_00000.pt")
        (t / COMPLETE).write_text("x")
    (d / "latest").write_text(f"step{steps[-1]:08d}")
    return CheckpointManager(d, keep_last=2)


def test_resume_falls_back_past_broken_checkpoints(tmp_path, caplog):
    ck = make_ckpts(tmp_path)
    (tmp_path / "step00000006" / COMPLETE).unlink()  # lost its marker; `latest` still names it
    f = tmp_path / "step00000004" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:300])  # truncated
    with caplog.at_level(logging.WARNING, "imagebert_ds.train"):
        tag, client, rank_state = ck.load_newest(FakeEngine())
    assert tag == "step00000002" and client["step"] == 2 and rank_state["loader"] == 2
    assert "latest names step00000006, which has no COMPLETE marker" in caplog.text
    assert f"{f} is truncated or corrupt" in caplog.text
    assert (tmp_path / "step00000004.unloadable").is_dir()
    assert (tmp_path / "latest").read_text() == "step00000002"
    assert ck.complete_tags() == ["step00000002"]  # set-aside tags are not counted by pruning


def test_no_loadable_checkpoint_is_an_error_not_a_restart(tmp_path):
    ck = make_ckpts(tmp_path, steps=(2,))
    (tmp_path / "step00000002" / "rank_state_00000.pt").write_bytes(b"junk")
    with pytest.raises(TrainingError, match="checkpoints exist but none can be resumed from: .*"
                                            "rank_state_00000.pt is truncated or corrupt"):
        ck.load_newest(FakeEngine())
    # `latest` naming a deleted tag, nothing else: also an error
    other = tmp_path / "b"
    other.mkdir()
    (other / "latest").write_text("step00000009")
    with pytest.raises(TrainingError, match="latest names step00000009, which is missing"):
        CheckpointManager(other).load_newest(FakeEngine())
    empty = tmp_path / "c"
    empty.mkdir()
    assert CheckpointManager(empty).load_newest(FakeEngine()) is None  # a fresh start


def test_checkpoint_of_another_world_size_is_refused_clearly(tmp_path):
    """A 2-rank checkpoint resumed on 1 rank: refused before anything loads (the data position
    of each rank cannot be re-sharded), with the rank count to use."""
    ck = make_ckpts(tmp_path, steps=(2,), world=2)
    engine = FakeEngine()
    with pytest.raises(TrainingError, match=r"written by 2 rank\(s\), this run has 1: resume "
                                            r"with 2 ranks \(--nproc 2\)"):
        ck.load_newest(engine)
    assert engine.loaded == []


# ---- config holes: one-line errors naming the key ------------------------------------------
def test_config_holes_are_one_line_errors(toy_source, tmp_path):
    from imagebert_ds.train.config import load_run_config
    from rel_helpers import run_config

    cfg = run_config(tmp_path, toy_source, tmp_path / "out")
    (tmp_path / "afile").write_text("x")
    nested = tmp_path / "nested"
    (nested / "part1").mkdir(parents=True)
    for p in toy_source.glob("*.tar"):
        (nested / "part1" / p.name).write_bytes(p.read_bytes())
    cases = [([f"run.out_dir={tmp_path / 'afile'}"], "run.out_dir"),
             ([f"run.out_dir={tmp_path / 'afile' / 'run'}"], "run.out_dir"),
             (["log.every_steps=0"], "log.every_steps must be >= 1"),
             ([f"stages.0.sources.0.path={nested}"], "sources[0].path"),
             (["optimizer.lr=1e6"], "optimizer.lr"),
             (["training.max_bad_steps=0"], "training.max_bad_steps")]
    for overrides, needle in cases:
        with pytest.raises(ConfigError) as e:
            load_run_config(cfg, overrides)
        assert needle in str(e.value) and "\n" not in str(e.value), (overrides, str(e.value))
