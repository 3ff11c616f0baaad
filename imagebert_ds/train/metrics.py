"""Metrics: step timing, throughput, FLOPs/MFU, and the sinks (metrics.jsonl, W&B, progress bar).

FLOP formula (documented here, reported as ``perf/tflops`` and ``perf/mfu``). For a BERT encoder
with ``N`` non-embedding parameters, ``n_layer`` layers and hidden size ``H``, one training step
(forward + backward = 3x forward) over sequences of real (unpadded) lengths ``n_i`` costs

    6 * N * sum(n_i)  +  12 * n_layer * H * sum(n_i^2)  +  6 * H * V * n_mlm

(the dense matmuls, the attention score/value products as in the PaLM paper's appendix B, and the
MLM decoder over the masked positions; embedding lookups, LayerNorm and softmax are ignored). The
ITC passes (text-only and image-only through the same encoder) add their own tokens the same way.
Padding is *not* counted: the number is the useful model FLOPs, so padding waste lowers MFU.

MFU = achieved model TFLOP/s per device / the device's peak dense bf16 TFLOP/s (``PEAK_TFLOPS``,
from the vendors' data sheets, without sparsity), or ``log.peak_tflops`` from the run config. On a
CPU, or an unknown device without ``log.peak_tflops``, MFU is not reported.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

# Peak dense bf16 tensor TFLOP/s per device (no sparsity), keyed by a substring of the CUDA name.
PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "V100": 125.0,  # fp16 tensor cores
}


def device_peak_tflops(override: float | None = None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def non_embedding_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters()
               if "embeddings" not in n and "decoder" not in n)


def step_flops(n_params: int, n_layer: int, hidden: int, vocab: int, seq_lens: torch.Tensor,
               n_mlm: int) -> float:
    """Training FLOPs of one step; ``seq_lens`` (S,) real token counts of every encoder pass."""
    lens = seq_lens.double()
    return float(6 * n_params * lens.sum() + 12 * n_layer * hidden * (lens ** 2).sum()
                 + 6 * hidden * vocab * n_mlm)


def peak_memory_gb() -> float:
    """Peak accelerator memory allocated (CUDA), else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class StepTimer:
    """Wall time of a step and the part of it spent waiting for data."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.data_wait = 0.0

    @contextlib.contextmanager
    def data(self):
        """``with timer.data(): batch = next(loader)`` -- counts the time blocked on the loader."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.data_wait += time.perf_counter() - t

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


class MetricsSink:
    """Rank 0's sinks: metrics.jsonl (always), W&B (per config), a tqdm progress bar."""

    def __init__(self, out_dir: Path, run_name: str, stage: str, total_steps: int,
                 wandb_cfg, resolved_config: dict, enabled: bool, progress: bool,
                 start_step: int = 0):
        self.enabled = enabled
        self.stage = stage
        self.run = None
        self.bar = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        if wandb_cfg.mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode,
                group=run_name, name=f"{run_name}-{stage}", job_type=stage,
                dir=str(out_dir), config=resolved_config, reinit="create_new",
            )
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, dynamic_ncols=True,
                            mininterval=1.0)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                         step=record["step"])
        if self.bar is not None:
            self.bar.n = record["step"]
            post = {"loss": f"{record['loss']:.3f}"}
            if "perf/samples_per_s" in record:
                post["samples/s"] = f"{record['perf/samples_per_s']:.1f}"
            self.bar.set_postfix(post, refresh=True)

    def summary(self, values: dict[str, Any], step: int) -> None:
        """End-of-stage results (e.g. retrieval R@K): logged once and kept in the run summary."""
        if self.enabled and self.run is not None:
            self.run.log(values, step=step)
            self.run.summary.update(values)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.run is not None:
            self.run.finish()
        self.jsonl.close()


def wandb_env_defaults(out_dir: str | os.PathLike) -> None:
    """Keep W&B's files inside the run directory and its console quiet."""
    os.environ.setdefault("WANDB_DIR", str(out_dir))
    os.environ.setdefault("WANDB_SILENT", "true")
