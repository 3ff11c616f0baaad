"""``imagebert-ds smoke``: a 20-step CPU training of the tiny model on one fixed random batch.

The batch follows docs/batch_contract.md (MLM-corrupted text, zeroed masked regions, half the pairs
mismatched) and is repeated every step, so each enabled loss must go down; the command exits 1 when
one does not. torch is imported inside the handler to keep ``imagebert-ds --help`` fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml"


def register(subparsers) -> None:
    p = subparsers.add_parser("smoke", help="20-step CPU training of the tiny model on random "
                              "tensors; fails unless every enabled loss decreases")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config YAML")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set pretraining.moc.variant=kl")
    p.set_defaults(func=_smoke)


def random_batch(config, batch_size: int, text_len: int = 12, regions: int = 10, generator=None) -> dict:
    """A random batch in the batch-contract layout (CPU tensors)."""
    import torch
    g = generator
    B, Lt, R, C = batch_size, text_len, min(regions, config.max_regions), config.num_object_classes
    ids = torch.randint(1000, config.vocab_size, (B, Lt), generator=g)
    ids[:, 0], ids[:, -1] = config.cls_token_id, 102
    attn = torch.ones(B, Lt, dtype=torch.long)
    attn[B // 2:, Lt - 3:] = 0                               # some padded captions
    ids[attn == 0] = config.pad_token_id
    mlm_pos = (torch.rand(B, Lt, generator=g) < 0.3) & (attn == 1)
    mlm_pos[:, 0] = mlm_pos[:, -1] = False
    mlm_pos[:, 1] = True                                      # >= 1 target per row
    mlm_labels = torch.where(mlm_pos, ids, torch.full_like(ids, -100))
    ids = torch.where(mlm_pos, torch.full_like(ids, 103), ids)  # [MASK]
    feats = torch.rand(B, R, config.region_feat_dim, generator=g)
    xy = torch.rand(B, R, 2, generator=g) * 0.5
    wh = torch.rand(B, R, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + wh, (wh[..., :1] * wh[..., 1:])], dim=-1)
    region_mask = torch.ones(B, R, dtype=torch.long)
    region_mask[-1, R // 2:] = 0
    masked = (torch.rand(B, R, generator=g) < 0.3) & region_mask.bool()
    masked[:, 0] = True
    probs = torch.rand(B, R, C, generator=g).pow(8)
    probs = probs / probs.sum(-1, keepdim=True)
    labels = probs.argmax(-1)
    return {
        "input_ids": ids, "attention_mask": attn, "token_type_ids": torch.zeros_like(ids),
        "mlm_labels": mlm_labels,
        "region_feats": feats.masked_fill(masked[..., None], 0.0), "region_boxes": boxes,
        "region_mask": region_mask,
        "moc_labels": torch.where(masked, labels, torch.full_like(labels, -100)),
        "moc_probs": probs, "mrfr_targets": feats, "region_masked": masked,
        "itm_labels": (torch.arange(B) % 2 == 0).long(),
    }


def _smoke(args: argparse.Namespace) -> int:
    import torch

    from .config import ImageBERTConfig
    from .pretraining import ImageBERTForPretraining

    torch.manual_seed(args.seed)
    config = ImageBERTConfig.from_yaml(args.config, args.overrides)
    model = ImageBERTForPretraining(config).train()
    batch = random_batch(config, args.batch_size, generator=torch.Generator().manual_seed(args.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    tasks = config.pretraining.enabled_tasks()
    first = last = None
    for step in range(args.steps):
        out = model(**batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        vals = {t: out[f"loss/{t}"].item() for t in tasks if f"loss/{t}" in out}
        vals["total"] = out["loss"].item()
        if step == 0:
            first = vals
        last = vals
        if step in (0, args.steps - 1):
            print(f"step {step:3d} " + " ".join(f"{k}={v:.4f}" for k, v in vals.items()), flush=True)
    missing = [t for t in tasks if t not in first]
    failed = [k for k in first if not last[k] < first[k]]
    if missing:
        print(f"FAIL: enabled losses not computed: {missing} (skipped: {out['skipped']})")
    if failed:
        print(f"FAIL: losses did not decrease: {failed}")
    if missing or failed:
        return 1
    print(f"OK: all enabled losses decreased over {args.steps} steps ({', '.join(tasks)})")
    return 0
