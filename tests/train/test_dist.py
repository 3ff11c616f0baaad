"""The trainer with real processes: 2 CPU ranks over gloo through the deepspeed launcher.

Covers: ZeRO 0/1/2/3 equivalence and gradient accumulation (tests/train/dist/engine_equivalence.py),
a 2-stage run handing weights from stage 1 to stage 2, metrics.jsonl and the W&B offline runs,
SIGTERM -> checkpoint -> clean exit, bit-exact resume, and two "nodes" through the multi-node
launcher path on this one machine.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch_helpers import env, free_port, launcher

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TASKS = ("mlm", "moc", "mrfr", "itm", "itc")


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"run.out_dir={out}", f"stages.0.sources.0.path={data / 'stage1_web'}",
            f"stages.1.sources.0.path={data / 'stage2_clean'}",
            f"eval.retrieval_split={data / 'test'}", "eval.max_images=8",
            "stages.0.steps=8", "stages.0.warmup_steps=2", "stages.1.steps=4",
            "stages.1.warmup_steps=1", "checkpoint.every_steps=3", "checkpoint.keep_last=2",
            "log.every_steps=1", "log.progress=false", "log.sample_ids=true",
            "data.batch_size=4", "deepspeed.gradient_accumulation_steps=2", *extra]
    out_args = ["--module", "imagebert_ds.train", "--config", "configs/runs/toy.yaml"]
    for s in sets:
        out_args += ["--set", s]
    return out_args


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]


def losses(out: Path) -> list[tuple]:
    return [(r["stage"], r["step"], r["loss"], *(r[f"loss/{t}"] for t in TASKS))
            for r in metrics(out) if r["stage"] != "eval"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from imagebert_ds.data.toy import make_toy_data

    d = tmp_path_factory.mktemp("toy")
    make_toy_data(d, train=320, test=8, seed=3)
    return d


@pytest.fixture(scope="module")
def uninterrupted(toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runA") / "run"
    p = subprocess.run(launcher(2, run_args(toy, out)), cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory) -> dict:
    """The report of tests/train/dist/engine_equivalence.py, run once on 2 ranks."""
    report = tmp_path_factory.mktemp("eq") / "eq.json"
    p = subprocess.run(launcher(2, ["tests/train/dist/engine_equivalence.py", str(report)]), cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(report.read_text())


def test_zero_stages_and_grad_accumulation_agree(equivalence):
    r = equivalence
    base = r["zero0"]["losses"]
    assert r["zero0"]["max_param_change_from_init"] > 1e-4  # the steps really trained
    for key in ("zero1", "zero2", "zero3"):
        # identical inputs and weights: the same losses up to fp32 summation order
        for a, b in zip(r[key]["losses"], base):
            assert abs(a - b) <= 1e-5 * abs(b), (key, r[key]["losses"], base)
        # Adam divides by sqrt(v): for weights whose gradient is rounding noise, another reduction
        # order moves them by up to ~lr per step (seen: 6e-7 ZeRO-1/2, 4e-6 ZeRO-3, against a
        # largest update of 3e-3). A shard left stale or updated twice would differ by the update.
        change = r["zero0"]["max_param_change_from_init"]
        assert r[key]["max_param_diff_vs_zero0"] < 0.01 * change, (key, r[key], change)
    # 2 micro-batches of B/2 == 1 batch of B, under SGD (linear in the gradient, no clipping)
    ga1, ga2 = r["sgd_zero2"], r["sgd_zero2_ga2"]
    assert ga1["max_param_change_from_init"] > 1e-3
    for a, b in zip(ga2["losses"], ga1["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (ga2["losses"], ga1["losses"])
    # a wrong accumulation scale would be off by ~max_param_change; fp32 rounding is ~1e-7
    assert ga2["max_param_diff_vs_ga1"] < 1e-5 * max(1.0, ga1["max_param_change_from_init"]), r
    # Pixel-BERT's visual tokens (ResNet trunk, random pixel sampling) under ZeRO-3 == ZeRO-0
    p0, p3 = r["pixel_zero0"], r["pixel_zero3"]
    assert p0["max_param_change_from_init"] > 1e-4
    for a, b in zip(p3["losses"], p0["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (p3["losses"], p0["losses"])
    assert p3["max_param_diff_vs_zero0"] < 0.01 * p0["max_param_change_from_init"], (p3, p0)


def test_two_stage_run(uninterrupted):
    out = uninterrupted
    recs = metrics(out)
    s1 = [r for r in recs if r["stage"] == "stage1_web"]
    s2 = [r for r in recs if r["stage"] == "stage2_clean"]
    assert [r["step"] for r in s1] == list(range(1, 9)) and [r["step"] for r in s2] == [1, 2, 3, 4]
    for r in s1 + s2:
        for k in ["loss", "lr", "grad_norm", "perf/samples_per_s", "perf/tokens_per_s",
                  "perf/tflops_per_device", "perf/data_wait_frac", "mem/peak_gb"] + \
                 [f"loss/{t}" for t in TASKS]:
            assert r[k] is not None, (k, r)
    # it learns: 12 steps of 2 micro-batches of 4 are noisy step to step, not over halves
    seq = [r["loss"] for r in s1 + s2]
    assert sum(seq[6:]) < sum(seq[:6]), seq
    # the attention path that ran is recorded (no silent fallback to hide)
    assert s1[0]["backend"] == s2[0]["backend"] == "sdpa (padded), torch ops"
    # stage 2 starts from stage 1's exported weights, not from a fresh initialisation
    from imagebert_ds.model import ImageBERTForPretraining
    from imagebert_ds.train.trainer import param_checksum

    final1 = ImageBERTForPretraining.from_pretrained(out / "stage1_web" / "final")
    assert s2[0]["init/param_checksum"] == pytest.approx(param_checksum(final1), rel=1e-9)
    torch.manual_seed(1234)
    fresh = ImageBERTForPretraining(final1.config)
    assert s2[0]["init/param_checksum"] != pytest.approx(param_checksum(fresh), rel=1e-6)
    assert s1[0]["init/param_checksum"] == pytest.approx(param_checksum(fresh), rel=1e-9)
    # exported weights load without DeepSpeed; checkpoints pruned to keep_last, latest complete
    assert (out / "stage2_clean" / "final" / "COMPLETE").is_file()
    ck = out / "stage1_web" / "checkpoints"
    tags = sorted(p.name for p in ck.iterdir() if (p / "COMPLETE").exists())
    assert tags == ["step00000006", "step00000008"]
    assert (ck / "latest").read_text() == "step00000008"
    assert (out / "resolved_config.yaml").is_file()
    res = json.loads((out / "retrieval.json").read_text())
    assert set(res["image_to_text"]) == {"R@1", "R@5", "R@10"} and "rsum" in res
    assert res["num_images"] == 8


def wandb_records(path: Path):
    """The records of an offline run's ``run-*.wandb`` file (W&B's LevelDB-style log of
    ``wandb_internal_pb2.Record`` protos: 7-byte file header, 32 KiB blocks, chunks with a 7-byte
    crc/length/type header). This wandb version writes no wandb-summary.json offline."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def test_nonfinite_loss_with_finite_gradients_is_skipped_on_every_zero_stage(equivalence):
    """A NaN loss term that no gradient flows through: without help DeepSpeed applies the step
    (the control); with the trainer's ``poison_gradients`` it is skipped on ZeRO 0-3 in fp32 and
    bf16, and the next good step applies (tests/train/dist/bad_loss_skip.py)."""
    r = equivalence["bad_loss_skip"]
    assert sorted(r) == sorted(f"zero{z}_{p}" for z in range(4) for p in ("fp32", "bf16"))
    for key, v in r.items():
        assert not v["bad_step_applied"] and v["bad_step_max_change"] == 0.0, (key, v)
        assert v["good_step_applied"] and v["good_step_max_change"] > 1e-4, (key, v)
        assert v["good_step_finite"], (key, v)
        assert v["unpoisoned_bad_step_applied"] and v["unpoisoned_bad_step_max_change"] > 1e-4, \
            (key, v)


def test_wandb_offline_runs_hold_task_keys(uninterrupted):
    runs = sorted((uninterrupted / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # one W&B run per stage
    for run, steps in zip(runs, (8, 4)):
        recs = list(wandb_records(next(run.glob("run-*.wandb"))))
        history = [{it.key or "/".join(it.nested_key) for it in r.history.item}
                   for r in recs if r.WhichOneof("record_type") == "history"]
        logged = [h for h in history if "loss" in h]
        assert len(logged) == steps, (run, len(logged))
        for h in logged:
            assert {f"loss/{t}" for t in TASKS} | {"loss", "lr", "perf/samples_per_s"} <= h, h
    # the last stage's run also holds the retrieval result
    assert any("retrieval/text_to_image/R@1" in h for h in history)


def test_sigterm_checkpoints_and_resume_is_bit_exact(toy, uninterrupted, tmp_path):
    import psutil

    out = tmp_path / "run"
    args = run_args(toy, out, "wandb.mode=disabled")
    proc = subprocess.Popen(launcher(2, args), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2:
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    # Preemption: every rank gets SIGTERM (as Slurm/Kubernetes do).
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)
             if c.cmdline()[1:4] == ["-u", "-m", "imagebert_ds.train"]]  # not the launcher
    assert len(ranks) == 2
    for r in ranks:
        r.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "SIGTERM received" in log
    ck = out / "stage1_web" / "checkpoints"
    tag = (ck / "latest").read_text()
    stopped_at = int(tag.replace("step", ""))
    assert (ck / tag / "COMPLETE").is_file() and stopped_at < 8
    assert not (out / "stage1_web" / "final").exists()
    assert [r["step"] for r in metrics(out)][-1] == stopped_at

    p = subprocess.run(launcher(2, args + ["--resume"]), cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # identical loss sequence, every task, bit for bit, to the uninterrupted run
    assert losses(out) == losses(uninterrupted)


def sample_ids(out: Path) -> dict[str, str]:
    return {str(f.relative_to(out)): f.read_text() for f in sorted(out.glob("*/sample_ids/*"))}


def test_sigkill_mid_accumulation_and_resume_is_bit_exact(toy, uninterrupted, tmp_path):
    """Power loss: every process is SIGKILLed (no checkpoint on the way out) while a step's 2
    micro-batches are half done; --resume redoes the steps since the last checkpoint and matches
    the uninterrupted run bit for bit: every loss, the final weights, each rank's sample ids."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    args = run_args(toy, out, "wandb.mode=disabled")
    proc = subprocess.Popen(launcher(2, args), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ids0 = out / "stage1_web" / "sample_ids" / "rank00000.jsonl"

    def last_fetched() -> int:  # the step whose micro-batches rank 0 is fetching
        lines = ids0.read_text().splitlines() if ids0.is_file() else []
        return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0

    ranks = []
    try:
        deadline = time.time() + 300
        while last_fetched() < 5:  # past the checkpoint of step 3
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.01)
        ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)
                 if c.cmdline()[1:4] == ["-u", "-m", "imagebert_ds.train"]]
        for r in ranks:
            r.suspend()  # freeze both, look, then kill them where they stand
        fetched, done = last_fetched(), [r["step"] for r in metrics(out)][-1]
        assert done < fetched, (done, fetched)  # mid-way through the micro-batches of a step
        for r in ranks:
            r.kill()
        proc.kill()
        proc.wait()
    finally:
        for c in psutil.Process().children(recursive=True):
            c.kill()
    ck = out / "stage1_web" / "checkpoints"
    assert (ck / "latest").read_text() == "step00000003"
    p = subprocess.run(launcher(2, args + ["--resume"]), cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed stage stage1_web at step 3" in p.stdout + p.stderr
    assert losses(out) == losses(uninterrupted)
    assert sample_ids(out) == sample_ids(uninterrupted) and len(sample_ids(out)) == 4
    from safetensors.torch import load_file

    a, b = (load_file(o / "stage2_clean" / "final" / "model.safetensors")
            for o in (out, uninterrupted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_nodes_through_multinode_launcher(toy, tmp_path):
    """Two deepspeed launchers (--no_ssh, node_rank 0/1, 1 rank each) on this machine."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=1\nworker-1 slots=1\n")
    out = tmp_path / "run"
    port = str(free_port())
    # also the one real run under bf16 + ZeRO-3 (partitioned params, fp32 export via zero_to_fp32)
    sets = run_args(toy, out, "wandb.mode=disabled", "stages.0.steps=3", "stages.1.steps=2",
                    "deepspeed.bf16=true", "deepspeed.zero_stage=3")[4:]
    procs = []
    for node in (0, 1):
        e = dict(env(), HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                 NO_SSH="1", NODE_RANK=str(node), NUM_GPUS="1", PY=sys.executable)
        procs.append(subprocess.Popen(["bash", "launch/multinode.sh", "configs/runs/toy.yaml",
                                       *sets], cwd=REPO, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    tag = out / "stage1_web" / "checkpoints" / "step00000003"
    assert (tag / "rank_state_00000.pt").is_file() and (tag / "rank_state_00001.pt").is_file()
    assert [r["step"] for r in metrics(out) if r["stage"] == "stage2_clean"] == [1, 2]
    from imagebert_ds.model import ImageBERTForPretraining

    final = ImageBERTForPretraining.from_pretrained(out / "stage2_clean" / "final")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in final.parameters())


def test_nonfinite_loss_stops_before_the_update_and_keeps_the_checkpoint(toy, tmp_path):
    """bf16/fp32: a non-finite loss stops every rank with an error naming the step and the
    losses (exit 1), before the optimizer step; the last complete checkpoint stays the latest.
    With ``training.max_bad_steps`` above the count, the same steps are skipped instead
    (DeepSpeed's ZeRO-2 optimizer drops the non-finite update) and the run finishes."""
    import shutil

    from imagebert_ds.model import ImageBERTForPretraining

    out = tmp_path / "run"
    ck = out / "stage1_web" / "checkpoints"
    base = run_args(toy, out, "wandb.mode=disabled", "stages.0.steps=4", "stages.0.warmup_steps=1",
                    "stages.1.steps=2", "checkpoint.every_steps=2", "eval.retrieval_split=null")
    p = subprocess.run(launcher(2, base), cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # make stage 1 unfinished again and continue it to step 8 with an MLM weight that overflows
    # float32: from step 5 on every loss is +inf
    shutil.rmtree(out / "stage1_web" / "final")
    shutil.rmtree(out / "stage2_clean")
    bad = base + ["--set", "stages.0.steps=8", "--set", "stages.0.objectives.mlm=1e39",
                  "--set", "training.max_bad_steps=1", "--resume"]
    p = subprocess.run(launcher(2, bad), cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode != 0, log[-3000:]
    assert "training stopped: stage stage1_web step 5: non-finite loss" in log, log[-3000:]
    assert "loss/mlm: " in log and "max_bad_steps=1" in log
    assert (ck / "latest").read_text() == "step00000004" and (ck / "step00000004" / "COMPLETE").is_file()
    assert not (out / "stage1_web" / "final").exists()
    # the same continuation, tolerating the bad steps: skipped by DeepSpeed, the weights stay finite
    ok = bad[:-1] + ["--set", "training.max_bad_steps=10", "--resume"]
    p = subprocess.run(launcher(2, ok), cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    recs = [r for r in metrics(out) if r["stage"] == "stage1_web"]
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert recs[-1]["bad_steps"] == 4 and recs[-1]["skipped_steps"] == 4, recs[-1]
    final = ImageBERTForPretraining.from_pretrained(out / "stage1_web" / "final")
    assert all(torch.isfinite(q).all() for q in final.parameters())
