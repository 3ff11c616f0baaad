"""Imported by engine_equivalence.py (under ``deepspeed --num_gpus 2``): a non-finite loss whose
gradients are finite (a NaN term no gradient flows through) never reaches the weights, on ZeRO 0-3
in fp32 and bf16.

For each setting: one step whose loss is ``loss + NaN`` (the gradients stay those of ``loss``),
gradients poisoned as the trainer does when the ranks agree on a bad loss
(``guard.poison_gradients``), ``engine.step()``: the weights must not move and DeepSpeed must
report the step as not applied; then a normal step, which must apply. A control step without the
poisoning shows that the update would otherwise be applied. ``skip_report`` returns the
numbers; the pytest side asserts.
"""
import torch

from imagebert_ds.config_utils import from_dict
from imagebert_ds.model import ImageBERTForPretraining
from imagebert_ds.testing import contract_batch
from imagebert_ds.train.config import RunConfig
from imagebert_ds.train.guard import poison_gradients
from imagebert_ds.train.trainer import build_engine

B = 4


def engine_for(zero: int, bf16: bool, device):
    cfg = from_dict(RunConfig, {
        "model": {"config": "tiny",
                  "overrides": {"max_regions": 3, "hidden_dropout_prob": 0.0,
                                "attention_probs_dropout_prob": 0.0}},
        "optimizer": {"lr": 1e-3},
        "deepspeed": {"zero_stage": zero, "bf16": bf16},
        "stages": [{"name": "s", "steps": 10, "warmup_steps": 0, "sources": [{"path": "."}],
                    "objectives": {"mlm": 1.0, "moc": 1.0, "mrfr": 1.0, "itm": 1.0}}]})
    torch.manual_seed(0)
    model = ImageBERTForPretraining(cfg.model_config(cfg.stages[0]))
    return build_engine(cfg, cfg.stages[0], model, device, B), model.config


def weights(engine, zero: int) -> torch.Tensor:
    params = list(engine.module.parameters())
    if zero == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return torch.cat([p.detach().float().flatten().clone() for p in params])
    return torch.cat([p.detach().float().flatten().clone() for p in params])


def step(engine, mcfg, n: int, nan_term: bool, poison: bool, rank: int) -> bool:
    g = torch.Generator().manual_seed(100 * n + rank)
    batch = contract_batch(mcfg, B, text_len=9, regions=3, generator=g)
    out = engine(**batch)
    loss = out["loss"] + float("nan") if nan_term else out["loss"]
    engine.backward(loss)
    if poison:
        poison_gradients(engine.module.bert.embeddings.word_embeddings.weight)
    engine.step()
    return bool(engine.was_step_applied())


def skip_report(rank: int, device) -> dict:
    """{"zero<z>_<fp32|bf16>": what the bad, the good and the unpoisoned bad step did}."""
    report = {}
    for zero in (0, 1, 2, 3):
        for bf16 in (False, True):
            engine, mcfg = engine_for(zero, bf16, device)
            w0 = weights(engine, zero)
            applied_bad = step(engine, mcfg, 1, nan_term=True, poison=True, rank=rank)
            w1 = weights(engine, zero)
            applied_good = step(engine, mcfg, 2, nan_term=False, poison=False, rank=rank)
            w2 = weights(engine, zero)
            applied_control = step(engine, mcfg, 3, nan_term=True, poison=False, rank=rank)
            w3 = weights(engine, zero)
            report[f"zero{zero}_{'bf16' if bf16 else 'fp32'}"] = {
                "bad_step_applied": applied_bad,
                "bad_step_max_change": (w1 - w0).abs().max().item(),
                "good_step_applied": applied_good,
                "good_step_max_change": (w2 - w1).abs().max().item(),
                "good_step_finite": bool(torch.isfinite(w2).all()),
                "unpoisoned_bad_step_applied": applied_control,
                "unpoisoned_bad_step_max_change": (w3 - w2).abs().max().item(),
            }
            del engine
    return report
