"""Resume the first stage of a run config in this process (the trainer's own setup + resume, as
``--resume`` does) and save what the engine then holds: the full fp32 (master) weights, gathered
over the ranks, the step and the learning rate. ``python resume_probe.py CONFIG OUT.pt [KEY=VALUE ...]``,
one rank or under the deepspeed launcher."""
from __future__ import annotations

import sys

import torch


def main(config: str, out: str, overrides: list[str]) -> None:
    from deepspeed.utils import safe_get_full_fp32_param

    from imagebert_ds.train.config import load_run_config
    from imagebert_ds.runtime.distributed import init_distributed
    from imagebert_ds.train.trainer import Trainer

    cfg = load_run_config(config, overrides + ["run.resume=auto"])
    rank, world, device = init_distributed()
    trainer = Trainer(cfg, rank, world, device)
    st = trainer.setup(cfg.stages[0], None)
    try:
        trainer.resume(st)
        got = {"step": st.step, "lr": st.engine.get_lr(), "weights": {}}
        for name, p in st.engine.module.named_parameters():
            got["weights"][name] = safe_get_full_fp32_param(p).detach().cpu().clone()
        if rank == 0:
            torch.save(got, out)
    finally:
        st.close()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1], args[2:])
