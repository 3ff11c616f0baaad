"""Run under ``deepspeed --num_gpus 2``: ZeRO 0/1/2/3 agree, and 2 x B/2 accumulation equals 1 x B;
also the non-finite-loss skip on every ZeRO stage (bad_loss_skip.py, in the same processes).

Writes a JSON report (rank 0) to the path given as the first argument; the pytest side asserts.
ZeRO stages use the trainer's own ``build_engine`` (AdamW); accumulation is compared under plain
SGD (see ``make_engine``). The tiny model runs with dropout off and fp32, on fixed
synthetic batches in which every row has exactly one MLM token and one masked region, so that
per-micro-batch means of the masked losses average to the full-batch mean (ITC, an in-batch
contrastive loss, is not accumulation-invariant and is left out here).
"""
import json
import sys

import torch

from imagebert_ds.runtime.distributed import init_distributed

rank, world, device = init_distributed()
import torch.distributed as dist  # noqa: E402

from imagebert_ds.config_utils import from_dict  # noqa: E402
from imagebert_ds.model import ImageBERTForPretraining  # noqa: E402
from imagebert_ds.train.config import RunConfig  # noqa: E402
from imagebert_ds.train.engine import build_ds_config  # noqa: E402
from imagebert_ds.testing import contract_batch  # noqa: E402
from imagebert_ds.train.trainer import build_engine  # noqa: E402

B, LT, R = 8, 9, 3
STEPS = 3
OBJ = {"mlm": 1.0, "moc": 1.0, "mrfr": 1.0, "itm": 1.0}


PIXEL_OBJ = {"mlm": 1.0, "itm": 1.0}


def run_cfg(zero: int, ga: int = 1, pixel: bool = False) -> RunConfig:
    overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if not pixel:
        overrides["max_regions"] = R
    return from_dict(RunConfig, {
        "model": {"config": 'pixelbert_tiny' if pixel else 'tiny',
                  "overrides": overrides},
        "optimizer": {"lr": 1e-3},
        "deepspeed": {"zero_stage": zero, "gradient_accumulation_steps": ga},
        "stages": [{"name": "s", "steps": 10, "warmup_steps": 0, "sources": [{"path": "."}],
                    "objectives": PIXEL_OBJ if pixel else OBJ}],
    })


def batch(step: int, pixel: bool = False) -> dict:
    """Every row: exactly one MLM token and one masked region, no padding (see the docstring);
    pixel models: 32 x 32 images instead of regions."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    b = contract_batch(MCFG, B, text_len=LT, regions=R, one_target_per_row=True, with_probs=False,
                       generator=g)
    if pixel:
        b = {k: v for k, v in b.items() if not k.startswith(("region", "moc", "mrfr"))}
        b["pixel_values"] = torch.randn(B, 3, 32, 32, generator=g)
    return b


def make_engine(zero: int, ga: int, sgd: bool, pixel: bool = False):
    cfg = run_cfg(zero, ga, pixel)
    torch.manual_seed(0)
    model = ImageBERTForPretraining(cfg.model_config(cfg.stages[0]))
    if not sgd:  # the trainer's own engine: AdamW, warmup/decay, clipping
        return build_engine(cfg, cfg.stages[0], model, device, B // ga)
    # Plain SGD without clipping: the update is linear in the gradient, so a wrong accumulation
    # scale (e.g. micro-batch losses not divided by the number of micro-batches) shows up, which
    # Adam's scale invariance would hide.
    import deepspeed

    ds = build_ds_config(cfg.deepspeed, B // ga)
    ds["gradient_clipping"] = 0.0
    ds["zero_allow_untested_optimizer"] = True  # ZeRO-2 wraps any torch optimizer fine
    engine, *_ = deepspeed.initialize(model=model, config=ds,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    return engine


def train(zero: int, ga: int, sgd: bool = False,
          pixel: bool = False) -> tuple[list[float], torch.Tensor]:
    engine = make_engine(zero, ga, sgd, pixel)
    losses = []
    for step in range(STEPS):
        full = batch(step, pixel)
        torch.manual_seed(100 + step)  # Pixel-BERT's random pixel sampling: the same draw
        tot = 0.0
        for m in range(ga):
            sl = slice(m * B // ga, (m + 1) * B // ga)
            out = engine(**{k: v[sl] for k, v in full.items()})
            engine.backward(out["loss"])
            engine.step()
            tot += out["loss"].item() / ga
        t = torch.tensor([tot], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(t.item() / world)
    if zero == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            flat = torch.cat([p.detach().float().flatten().clone() for p in engine.module.parameters()])
    else:
        flat = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])
    return losses, flat


MCFG = run_cfg(0).model_config(run_cfg(0).stages[0])
report = {}
torch.manual_seed(0)
init = torch.cat([p.detach().flatten() for p in
                  ImageBERTForPretraining(run_cfg(0, 1).model_config(run_cfg(0, 1).stages[0])).parameters()])
base_losses, base_params = train(0, 1)
report["zero0"] = {"losses": base_losses,
                   "max_param_change_from_init": (base_params - init).abs().max().item()}
for z in (1, 2, 3):
    losses, params = train(z, 1)
    report[f"zero{z}"] = {"losses": losses,
                          "max_param_diff_vs_zero0": (params - base_params).abs().max().item()}
sgd_losses, sgd_params = train(2, 1, sgd=True)
losses, params = train(2, 2, sgd=True)
report["sgd_zero2"] = {"losses": sgd_losses,
                       "max_param_change_from_init": (sgd_params - init).abs().max().item()}
report["sgd_zero2_ga2"] = {"losses": losses,
                           "max_param_diff_vs_ga1": (params - sgd_params).abs().max().item()}
# Pixel-BERT (ResNet trunk + sampled visual tokens) under ZeRO-3 equals ZeRO-0
torch.manual_seed(0)
p_init = torch.cat([p.detach().flatten() for p in ImageBERTForPretraining(
    run_cfg(0, 1, True).model_config(run_cfg(0, 1, True).stages[0])).parameters()])
p0_losses, p0_params = train(0, 1, pixel=True)
p3_losses, p3_params = train(3, 1, pixel=True)
report["pixel_zero0"] = {"losses": p0_losses,
                         "max_param_change_from_init": (p0_params - p_init).abs().max().item()}
report["pixel_zero3"] = {"losses": p3_losses,
                         "max_param_diff_vs_zero0": (p3_params - p0_params).abs().max().item()}
from bad_loss_skip import skip_report  # noqa: E402 - beside this script

report["bad_loss_skip"] = skip_report(rank, device)
if rank == 0:
    with open(sys.argv[-1], "w") as f:
        json.dump(report, f, indent=1)
dist.barrier()
