"""One run per out_dir and no orphans, with the real ``imagebert-ds pretrain --nproc 2``:
a second run into the directory is refused naming the holder; SIGKILL of the command ends the
launcher and both ranks (they checkpoint on the way out) and leaves no lock behind; resuming that
2-rank ZeRO-2 checkpoint on one rank is refused, saying how many ranks to use, unless
``data.resume_data=restart``: then the weights and optimizer state are re-sharded onto one rank
(the weights of the 2-rank checkpoint, exactly) and the data position restarts."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from rel_helpers import REPO, cli, env, metrics, run_config

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_sigkill_ends_the_ranks_a_second_run_is_refused_and_a_resume_on_fewer_ranks_too(toy_source, tmp_path):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    cfg = run_config(tmp_path, toy_source, out, checkpoint={"every_steps": 0, "keep_last": 1},
                     deepspeed={"zero_stage": 2})
    cmd = cli("pretrain", "--nproc", "2", "--config", str(cfg), "--set", "stages.0.steps=100000")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.3)
        tree = psutil.Process(proc.pid).children(recursive=True)
        ranks = [c for c in tree if c.cmdline()[1:4] == ["-u", "-m", "imagebert_ds.train"]]
        assert len(ranks) == 2
        # a second run into the same out_dir: refused before launching, naming the holder
        second = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 1, second.stderr[-2000:]
        assert f"run.out_dir {out} is in use by another run: pid {ranks[0].pid}" in second.stderr \
            or f"run.out_dir {out} is in use by another run: pid {ranks[1].pid}" in second.stderr
        proc.send_signal(signal.SIGKILL)  # nothing of the command runs any more
        proc.wait()
        gone, alive = psutil.wait_procs(tree, timeout=90)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
    log = proc.stdout.read()
    assert "is gone: stopping this rank" in log, log[-3000:]
    assert (out / "s1" / "checkpoints" / "latest").is_file()  # they stopped as on SIGTERM
    assert not (out / "run.lock").exists()
    # the data position of each of the 2 ranks cannot be re-sharded onto 1: refused, clearly
    one = subprocess.run(cli("pretrain", "--config", str(cfg), "--resume"), cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 1, one.stderr[-2000:]
    assert "written by 2 rank(s), this run has 1: resume with 2 ranks (--nproc 2)" in one.stderr

    # ... or re-sharded: what one rank resumes (the trainer's own setup + resume,
    # tests/reliability/resume_probe.py) holds the fp32 weights of the 2-rank checkpoint, as
    # DeepSpeed's zero_to_fp32 rebuilds them from the two optimizer shards, within 1e-7
    tag = (out / "s1" / "checkpoints" / "latest").read_text().strip()
    one = subprocess.run([sys.executable, "tests/reliability/resume_probe.py", str(cfg),
                          str(tmp_path / "one.pt"), "data.resume_data=restart"],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    assert "converting to DeepSpeed's universal checkpoint format" in one.stderr
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    got = torch.load(tmp_path / "one.pt", weights_only=False)
    want = get_fp32_state_dict_from_zero_checkpoint(str(out / "s1" / "checkpoints"), tag)
    assert got["step"] == int(tag.removeprefix("step")) > 0
    assert got["weights"].keys() <= want.keys() and got["weights"]
    worst = max((got["weights"][k] - want[k].float()).abs().max().item() for k in got["weights"])
    assert worst <= 1e-7, worst
    # and the CLI goes on from there on one rank, two more steps
    more = subprocess.run(cli("pretrain", "--config", str(cfg), "--resume", "--set",
                              "data.resume_data=restart", "--set",
                              f"stages.0.steps={got['step'] + 2}"),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "re-sharded onto 1, the data position restarted" in more.stderr
    assert [r["step"] for r in metrics(out)][-2:] == [got["step"] + 1, got["step"] + 2]

