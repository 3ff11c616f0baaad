"""``imagebert-ds evaluate`` end to end on a tiny toy split and a tiny random model saved with
``save_pretrained``; what ``--checkpoint`` accepts; the W&B record of a run's evaluation; the
``Scorer`` API."""
import json
import shutil

import pytest
import torch

from eval_helpers import one_thread, MAX_REGIONS, MAX_TEXT_LEN, REPO, make_model_dir, make_split_dir
from imagebert_ds.cli import main



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_split_dir(tmp_path_factory.mktemp("toy"), images=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


def evaluate(*args):
    return main(["evaluate", "--no-progress", "--max-text-len", str(MAX_TEXT_LEN),
                 "--max-regions", str(MAX_REGIONS), *map(str, args)])


def test_cli_both_modes(toy, model_dir, tmp_path, capsys):
    assert evaluate("--checkpoint", model_dir, "--split", toy, "--mode", "full",
                    "--out", tmp_path / "full.json", "--batch-size", 7) == 0
    table = capsys.readouterr().out
    assert "| full | " in table and "Image→Text R@1" in table
    full = json.loads((tmp_path / "full.json").read_text())
    for key in ("image_to_text", "text_to_image", "rsum", "num_images", "num_texts",
                "eval_seconds", "mode", "k", "protocol", "seconds"):
        assert key in full, key
    assert set(full["image_to_text"]) == {"R@1", "R@5", "R@10"}
    assert (full["num_images"], full["num_texts"], full["mode"], full["k"]) == (10, 50, "full", None)
    assert not (tmp_path / "full.json.partial").exists()  # removed once the result is written
    assert evaluate("--checkpoint", model_dir, "--split", toy, "--k", 50,
                    "--out", tmp_path / "two.json", "--batch-size", 7) == 0
    out = capsys.readouterr().out
    assert "| two-stage (k=50) |" in out and "ITC only" in out and "outside the top-50" in out
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["mode"] == "two-stage" and two["k"] == 50
    assert two["outside_topk"] == {"image_to_text": 0.0, "text_to_image": 0.0}
    for key in ("image_to_text", "text_to_image", "rsum"):  # k >= every candidate: = full
        assert two[key] == full[key]


def test_cli_errors(toy, model_dir, tmp_path, capsys):
    no_itc = make_model_dir(tmp_path / "itm_only", objectives="{itm: 1.0}")
    assert evaluate("--checkpoint", no_itc, "--split", toy, "--out", tmp_path / "x.json") == 2
    assert "no itc head" in capsys.readouterr().err
    assert evaluate("--checkpoint", tmp_path / "nope", "--split", toy, "--out", tmp_path / "x") == 2
    assert f"checkpoint {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert evaluate("--checkpoint", tmp_path / "empty", "--split", toy, "--out", tmp_path / "x") == 2
    assert "not a model directory" in capsys.readouterr().err
    assert evaluate("--checkpoint", model_dir, "--split", toy, "--protocol", "coco-5k",
                    "--mode", "full", "--out", tmp_path / "x") == 2
    assert "coco-5k needs 5000 test images, the split has 10" in capsys.readouterr().err


def _fake_run(root, model_dir, wandb_mode="offline"):
    """A run directory as the trainer leaves it: resolved config + <stage>/final/COMPLETE."""
    import yaml

    from imagebert_ds.config_utils import load_yaml

    cfg = load_yaml(REPO / "configs" / "runs" / "toy.yaml")
    cfg["run"]["out_dir"] = str(root)
    cfg["wandb"]["mode"] = wandb_mode
    for s in cfg["stages"]:
        s["sources"] = [{"path": str(root / "nowhere"), "ratio": 1.0}]
    root.mkdir(parents=True)
    (root / "resolved_config.yaml").write_text(yaml.safe_dump(cfg))
    final = root / cfg["stages"][-1]["name"] / "final"
    shutil.copytree(model_dir, final)
    return final


def test_checkpoint_resolution(tmp_path, model_dir):
    from imagebert_ds.eval.data import eval_data_config
    from imagebert_ds.run.resolve import resolve_checkpoint

    final = _fake_run(tmp_path / "run", model_dir)
    with pytest.raises(ValueError, match="export is incomplete.*COMPLETE"):
        resolve_checkpoint(final)
    with pytest.raises(ValueError, match="last stage 'stage2_clean' has no complete export"):
        resolve_checkpoint(tmp_path / "run")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "run" / "stage2_clean")
    (final / "COMPLETE").write_text("done\n")
    for p in (final, tmp_path / "run", tmp_path / "run" / "stage2_clean"):
        ck = resolve_checkpoint(p)
        assert ck.model_dir == final and ck.run_dir == tmp_path / "run"
        assert ck.stage == "stage2_clean"
    # the run's data settings: the toy run's max_text_len 32 / max_regions 4
    from imagebert_ds.model import PretrainingConfig

    cfg = eval_data_config(ck, PretrainingConfig.from_yaml(final / "config.yaml"))
    assert (cfg.max_text_len, cfg.max_regions) == (32, 4)
    bare = resolve_checkpoint(model_dir)
    assert bare.run_dir is None
    (tmp_path / "half").mkdir()
    shutil.copy(model_dir / "config.yaml", tmp_path / "half")
    with pytest.raises(ValueError, match="config.yaml without model.safetensors"):
        resolve_checkpoint(tmp_path / "half")


def test_run_checkpoint_logs_to_wandb(tmp_path, toy, model_dir, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    final = _fake_run(tmp_path / "run", model_dir)
    (final / "COMPLETE").write_text("done\n")
    out = tmp_path / "ev.json"
    assert main(["evaluate", "--no-progress", "--checkpoint", str(tmp_path / "run"),
                 "--split", str(toy), "--mode", "full", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "stage2_clean/final" in res["checkpoint"]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_scorer_round_trip(toy, model_dir):
    from imagebert_ds import Scorer
    from imagebert_ds.eval.evaluate import itm_score_matrix

    scorer = Scorer.from_pretrained(model_dir, device="cpu", batch_size=4,
                                    max_text_len=MAX_TEXT_LEN, max_regions=MAX_REGIONS)
    split = scorer.load_split(toy)
    caps = split.captions[:6]
    # every pair: the evaluator's scores, as probabilities
    m = scorer.score_matrix(toy, caps)
    ref = itm_score_matrix(scorer.model, split, batch_size=4)[:, :6]
    assert m.shape == (10, 6) and ((m > 0) & (m < 1)).all()
    torch.testing.assert_close(torch.logit(m.double()).float(), ref, rtol=1e-4, atol=1e-4)
    # pairwise from region arrays (numpy, 4-d pixel boxes + size, as in the shards)
    import numpy as np

    imgs = [{"region_feats": split.region_feats[i, :int(split.region_mask[i].sum())].numpy(),
             "region_boxes": split.region_boxes[i, :int(split.region_mask[i].sum())].numpy()}
            for i in range(3)]
    p = scorer.score(imgs, caps[:3])
    torch.testing.assert_close(p, m[torch.arange(3), torch.arange(3)], rtol=1e-4, atol=1e-5)
    pix = dict(imgs[0], region_boxes=imgs[0]["region_boxes"][:, :4] * 64.0, width=64, height=64)
    torch.testing.assert_close(scorer.score(pix, caps[0]), p[:1], rtol=1e-4, atol=1e-5)
    # one image against many captions broadcasts; a batched dict works like a list
    torch.testing.assert_close(scorer.score(imgs[1], caps), m[1], rtol=1e-4, atol=1e-5)
    batched = {"region_feats": split.region_feats[:3], "region_boxes": split.region_boxes[:3],
               "region_mask": split.region_mask[:3]}
    torch.testing.assert_close(scorer.score(batched, caps[:3]), p, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="use score_matrix"):
        scorer.score(imgs, caps[:2])
    # ITC embeddings: the evaluator's first stage
    from imagebert_ds.eval.evaluate import EvalOptions, itc_embeddings

    e_img, e_txt = scorer.embed_images(toy), scorer.embed_texts(split.captions)
    r_img, r_txt = itc_embeddings(scorer.model, split, EvalOptions(batch_size=4, progress=False))
    torch.testing.assert_close(e_img, r_img)
    torch.testing.assert_close(e_txt, r_txt)
    assert e_img.shape == (10, 16)
    torch.testing.assert_close(e_txt.norm(dim=1), torch.ones(50))
    assert np.isfinite(scorer.embed_images(imgs).numpy()).all()


def test_run_config_eval_section():
    from imagebert_ds.config_utils import ConfigError
    from imagebert_ds.train.config import load_run_config

    toy = REPO / "configs" / "runs" / "toy.yaml"
    cfg = load_run_config(toy, check_data=False)
    assert (cfg.eval.mode, cfg.eval.k, cfg.eval.also_full) == ("two-stage", 16, True)
    with pytest.raises(ConfigError, match="eval.mode two-stage.*no itc objective"):
        load_run_config(toy, ["stages.1.objectives={mlm: 1.0, itm: 1.0}"], check_data=False)
    load_run_config(toy, ["stages.1.objectives={mlm: 1.0, itm: 1.0}", "eval.mode=auto"],
                    check_data=False)
    with pytest.raises(ConfigError, match="eval.k must be >= 1"):
        load_run_config(toy, ["eval.k=0"], check_data=False)
