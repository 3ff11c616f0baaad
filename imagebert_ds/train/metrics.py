"""Metrics: step statistics, timing, throughput, MFU, and the sinks (metrics.jsonl, W&B, progress).

``StepStats`` holds one optimizer step's sums (loss, each objective's loss, samples, real tokens,
model FLOPs, non-finite micro-batches) as tensors on the training device: nothing is copied to
the host while the step runs, and ``reduce`` sums them over ranks and reads them back in one go,
only for the steps that are logged (torchtitan's habit, "so loss normalization does not introduce
a CPU synchronization").

FLOPs: ``imagebert_ds.model.flops`` documents the formula (real tokens only, so padding waste
lowers MFU). MFU = achieved model TFLOP/s per device / the device's peak dense bf16 TFLOP/s
(``PEAK_TFLOPS``, from the vendors' data sheets, without sparsity), or ``log.peak_tflops`` from the
run config. On a CPU, or an unknown device without ``log.peak_tflops``, MFU is not reported.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist

@dataclass
class WandbConfig:
    """Weights & Biases mode (offline by default: no network needed), project and entity."""
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "imagebert_ds"
    entity: Optional[str] = None


@dataclass
class LogConfig:
    """Logging cadence (a step's statistics are read from the device only when it is logged),
    the progress bar, and the device peak used for MFU."""
    every_steps: int = 1
    progress: bool = True
    # Peak dense bf16/fp16 TFLOP/s per device used for MFU; null = look the device up
    # (imagebert_ds.train.metrics.PEAK_TFLOPS) or report no MFU on an unknown device.
    peak_tflops: Optional[float] = None
    # Audit the data order: every rank appends the image ids of each micro-batch to
    # <stage>/sample_ids/rankRRRRR.jsonl ({"step", "micro", "ids"}, one flushed line each);
    # a resume drops the lines past the resumed step, so the file matches an uninterrupted run's.
    sample_ids: bool = False

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(f"log.every_steps must be >= 1, got {self.every_steps}")


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
    """Peak dense bf16 TFLOP/s of this process's CUDA device (``override`` wins), or None."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


@dataclass
class StepStats:
    """Sums over one optimizer step's micro-batches, on the device until ``reduce``.

    ``values`` (4 + n_objectives,) float64: loss, real tokens, FLOPs, non-finite micro-batches,
    then each objective's loss (0 where its inputs were absent). ``samples`` is known on the
    host and stays there.
    """
    names: tuple[str, ...]
    values: torch.Tensor
    samples: int = 0

    FIELDS = ("loss", "tokens", "flops", "nonfinite")

    @classmethod
    def zeros(cls, names, device) -> "StepStats":
        """Empty statistics for objectives ``names`` on ``device``."""
        return cls(tuple(names), torch.zeros(len(cls.FIELDS) + len(names), dtype=torch.float64,
                                             device=device))

    def add(self, out: dict, samples: int, tokens: torch.Tensor, flops: torch.Tensor) -> None:
        """Add one micro-batch: the model's output dict and its work (device tensors)."""
        loss = out["loss"].detach().double()
        zero = loss.new_zeros(())
        v = [loss, tokens.double(), flops.double(), (~torch.isfinite(loss)).double()]
        v += [out[f"loss/{n}"].detach().double() if f"loss/{n}" in out else zero for n in self.names]
        self.values += torch.stack(v)
        self.samples += samples

    @property
    def nonfinite(self) -> torch.Tensor:
        """Number of micro-batches whose total loss was not finite (a device scalar)."""
        return self.values[3]

    def reduce(self, world: int, micro_batches: int,
               extra: dict[str, float] | None = None) -> dict[str, float]:
        """Sum over ranks (one all-reduce) and read back (one host sync): the losses as means
        over ranks and micro-batches, the work as per-step totals over ranks; ``extra`` host
        numbers ride along in the same all-reduce and come back as sums over ranks."""
        extra = extra or {}
        v = self.values.clone()
        if extra:
            v = torch.cat([v, v.new_tensor(list(extra.values()))])
        if world > 1:
            dist.all_reduce(v)
        v = v.tolist()
        sums = dict(zip(extra, v[len(v) - len(extra):]))
        v = v[:len(v) - len(extra)]
        n = world * micro_batches
        rec = {"loss": v[0] / n, "samples": self.samples * world, "tokens": v[1], "flops": v[2],
               "nonfinite": v[3]}
        rec.update({f"loss/{name}": x / n for name, x in zip(self.names, v[4:])})
        rec.update(sums)
        return rec


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
        """Start timing a new step."""
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
        """Seconds since ``reset``."""
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
        """Write one step record to metrics.jsonl, W&B (numbers only) and the progress bar."""
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
        """Close the progress bar, finish the W&B run, close metrics.jsonl."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.run is not None:
            self.run.finish()
        self.jsonl.close()
