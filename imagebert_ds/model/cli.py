"""``imagebert-ds smoke``: a 20-step CPU training of the tiny model on one fixed random batch.

The batch follows docs/batch_contract.md (MLM-corrupted text, zeroed masked regions, half the pairs
mismatched; ``imagebert_ds.testing.contract_batch``) and is repeated every step, so each enabled loss must go down; the command exits 1 when
one does not. torch is imported inside the handler to keep ``imagebert-ds --help`` fast.
"""
from __future__ import annotations

import argparse

DEFAULT_CONFIG = "tiny"  # a shipped model config (registry.list_models())


def register(subparsers) -> None:
    """Add the ``smoke`` sub-command."""
    p = subparsers.add_parser("smoke", help="20-step CPU training of the tiny model on random "
                              "tensors; fails unless every enabled loss decreases")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="a shipped model config's name or a model config YAML (default: tiny)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objectives", default="mlm,moc,mrfr,itm,itc",
                   help="comma-separated objectives to train (default: every registered one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set objectives.moc.variant=kl")
    p.set_defaults(func=_smoke)


def _smoke(args: argparse.Namespace) -> int:
    import torch

    from imagebert_ds.testing import contract_batch

    from .pretraining import PretrainingConfig
    from .pretraining import ImageBERTForPretraining

    torch.manual_seed(args.seed)
    objectives = "{" + ", ".join(f"{o}: {{weight: 1.0}}" for o in args.objectives.split(",")) + "}"
    config = PretrainingConfig.from_yaml(args.config, [f"objectives={objectives}", *args.overrides])
    model = ImageBERTForPretraining(config).train()
    batch = contract_batch(config, args.batch_size, generator=torch.Generator().manual_seed(args.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    tasks = list(config.objectives)
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
