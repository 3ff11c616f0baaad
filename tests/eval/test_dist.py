"""Retrieval evaluation over 2 real CPU ranks (gloo): the same bits as 1 rank, in both modes,
through the API (torch.multiprocessing) and through ``imagebert-ds evaluate --nproc 2`` (the
deepspeed launcher, as ``pretrain --nproc``), including a resume with another number of ranks."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eval_helpers import (MAX_REGIONS, MAX_TEXT_LEN, data_config, make_model_dir, make_split_dir,
                          tiny_model)

pytestmark = pytest.mark.dist

WORLD = 2


def _worker(rank, init_file, split_dir, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from imagebert_ds.data import load_retrieval_split
        from imagebert_ds.eval.evaluate import EvalOptions, score_rows, two_stage_scores

        split = load_retrieval_split(split_dir, data_config())
        opts = EvalOptions(batch_size=16, rank=rank, world_size=WORLD, progress=False)
        model = tiny_model()
        full = score_rows(model, split, None, opts)
        two = two_stage_scores(model, split, 3, opts)
        torch.save({"full": full, "i2t": two["i2t"], "t2i": two["t2i"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # skip gloo's C++ teardown (see test_model_itc_dist.py)


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    return make_split_dir(tmp_path_factory.mktemp("toy"), images=9)  # odd: ranks get 5 and 4 rows


def test_two_ranks_equal_one(split_dir, tmp_path):
    from imagebert_ds.data import load_retrieval_split
    from imagebert_ds.eval.evaluate import EvalOptions, score_rows, two_stage_scores

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(split_dir), str(tmp_path)), nprocs=WORLD,
             join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    torch.set_num_threads(1)
    split = load_retrieval_split(split_dir, data_config())
    opts = EvalOptions(batch_size=16, progress=False)
    model = tiny_model()
    full = score_rows(model, split, None, opts)
    two = two_stage_scores(model, split, 3, opts)
    for r in res:  # every rank holds the whole result, equal to one rank's bit for bit
        assert torch.equal(r["full"], full)
        assert torch.equal(r["i2t"], two["i2t"]) and torch.equal(r["t2i"], two["t2i"])


def _env():
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("CUDA_VISIBLE_DEVICES", None)
    e.pop("TRITON_INTERPRET", None)
    return e


def test_cli_nproc_2_equals_one_rank_and_resumes(split_dir, tmp_path, monkeypatch):
    """1 rank uninterrupted == a 1-rank run killed after 3 rows, resumed on 2 ranks."""
    from imagebert_ds.eval import cli as eval_cli
    from imagebert_ds.eval import evaluate as ev

    model_dir = make_model_dir(tmp_path / "model")
    common = ["--checkpoint", str(model_dir), "--split", str(split_dir), "--mode", "full",
              "--no-progress", "--batch-size", "16", "--max-text-len", str(MAX_TEXT_LEN),
              "--max-regions", str(MAX_REGIONS), "--save-every", "0"]
    cli = [sys.executable, "-m", "imagebert_ds.cli", "evaluate"]
    one = tmp_path / "one.json"
    subprocess.run(cli + common + ["--out", str(one)], check=True, env=_env(), timeout=300)
    # the interrupted run, in this process: the 4th row raises
    two = tmp_path / "two.json"
    rows = {"n": 0}
    orig = ev.itm_row_scores

    def interrupting(*a, **kw):
        rows["n"] += 1
        if rows["n"] > 3:
            raise KeyboardInterrupt
        return orig(*a, **kw)

    monkeypatch.setattr(ev, "itm_row_scores", interrupting)
    p = eval_cli.argparse.ArgumentParser()
    eval_cli.add_evaluate_args(p)
    with pytest.raises(KeyboardInterrupt):
        eval_cli.run_evaluate(p.parse_args(common + ["--out", str(two)]))
    assert len(list((tmp_path / "two.json.partial").glob("*.pt"))) == 3
    r = subprocess.run(cli + common + ["--nproc", "2", "--out", str(two)], env=_env(),
                       timeout=300, capture_output=True, text=True)
    log = r.stdout[-4000:] + r.stderr[-4000:]
    assert r.returncode == 0, log
    assert "3 score rows from an earlier run" in log
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    for key in ("image_to_text", "text_to_image", "rsum", "num_images", "num_texts"):
        assert a[key] == b[key], key
    assert not (tmp_path / "two.json.partial").exists()
