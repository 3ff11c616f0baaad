"""Scaling model: weak-scaling efficiency of data-parallel ImageBERT pre-training over 1-64 nodes.

    python benchmarks/scaling_model.py                    # step time from the latest GPU result
    python benchmarks/scaling_model.py --step-ms 95 --zero-stages 2 --overlap 0.3

Not a measurement: a bandwidth model fed with one measured number, the single-GPU step time.
Every assumption below is a CLI flag and is written into the results JSON.

Step time. ``--step-ms`` if given; else the ``trainer`` row (or the fastest backend row) of the
newest ``train_step`` result measured on a GPU with the same model config; else, without any GPU
measurement, an estimate: the trainer's FLOP count (``training_flops``, ``imagebert_ds.model.flops``)
of ``--batch`` samples of ``--text-tokens`` text + ``--regions`` region tokens, at ``--mfu`` of
``--peak-tflops`` (labelled ``estimate`` in the output). Weak scaling: the per-GPU micro-batch
stays fixed, so the compute time per optimizer step is ``accum x step`` at every scale.

Communication per optimizer step, for Psi parameters (counted from the model config with its
heads) of ``--grad-bytes`` bytes each (2: bf16 gradients and parameters): ZeRO-0/1/2 move 2 Psi
(a reduce-scatter of the gradients + an all-gather of the updated parameters: the volume of one
all-reduce), ZeRO-3 3 Psi (parameters all-gathered in the forward and again in the backward, plus
the gradient reduce-scatter). Each reduce-scatter or all-gather phase of S bytes is a
hierarchical ring (the ring all-reduce is two phases, 2 (N-1)/N x S / B):

    t_phase = (G-1)/G x S / B_nvlink + (M-1)/M x (S/G) / B_ib + (G-1) a_nvlink + (M-1) a_ib

for M nodes of G GPUs: a ring inside the node over NVLink (``--nvlink-gbs`` per GPU and
direction: H100 NVLink4 is 900 GB/s bidirectional = 450 GB/s each way), then a ring across nodes
in which each GPU moves its 1/G shard over its own rail (``--ib-gbs`` per node, 8 x 400 Gb/s NDR =
400 GB/s, shared by the G GPUs), plus a per-hop latency (``--nvlink-latency-us``,
``--ib-latency-us``). One GPU communicates nothing.

Overlap. ``--overlap`` is the fraction of the communication hidden behind compute, capped at the
backward pass (2/3 of the compute): DeepSpeed's ``overlap_comm`` runs the gradient reduce-scatter
during the backward, while ZeRO-2's parameter all-gather follows the optimizer step, hence the
default 0.5. Exposed = comm - min(overlap x comm, 2/3 x compute); step = compute + exposed.
Efficiency is reported against one GPU (no communication) and against one node (the convention
of NVIDIA's tables).

Ignored, so the model is an upper bound: stragglers and jitter, network congestion and NCCL's
protocol overheads, bucketing latency, the optimizer step's growth with ZeRO-0 replication, the
data loader. The published comparison: NVIDIA's DeepLearningExamples BERT for PyTorch, "Pre-training
NVIDIA DGX A100 (8x A100 80GB) Multi-node Scaling": BERT-large, sequence length 128, mixed
precision, 256 sequences per GPU micro-batch, global batch fixed at 65,536 (accumulation 32 steps
on one node down to 1 on 32 nodes), 4,553 sequences/s on one node and 138,294 on 32 nodes: 30.37x,
i.e. 94.9% of linear (NVIDIA's table calls it strong scaling: the global batch is fixed, the
per-GPU micro-batch too). ``reference`` in the results runs this model on that configuration
(A100 NVLink3 300 GB/s each way, 8 x 200 Gb/s HDR InfiniBand, fp16 all-reduce of ~335M
parameters) so the gap between model and measurement is visible.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NODES = [1, 2, 4, 8, 16, 32, 64]
BERT_LARGE_PARAMS = 335_174_458  # BertForPreTraining(bert-large-uncased), tied decoder counted once
PUBLISHED = {"source": "NVIDIA DeepLearningExamples, PyTorch/LanguageModeling/BERT README, "
                       "'Pre-training NVIDIA DGX A100 (8x A100 80GB) Multi-node Scaling'",
             "model": "BERT-large", "seq_len": 128, "precision": "mixed (fp16)",
             "micro_batch_per_gpu": 256, "global_batch": 65536, "nodes": 32, "gpus_per_node": 8,
             "throughput_1_node": 4553, "throughput_32_nodes": 138294, "speedup": 30.37,
             "efficiency": 30.37 / 32}


def count_params(model_cfg: str, objectives: list[str]) -> int:
    """Psi: the model's parameters with its objectives' heads (tied weights once), built on the
    meta device (no memory)."""
    from imagebert_ds.model import PretrainingConfig, ImageBERTForPretraining

    cfg = PretrainingConfig.from_dict({**PretrainingConfig.from_yaml(model_cfg).to_dict(),
                                     "objectives": {n: 1.0 for n in objectives}})
    with torch.device("meta"):
        model = ImageBERTForPretraining(cfg)
    return sum(p.numel() for p in model.parameters())


def estimate_step_ms(args) -> float:
    """The trainer's FLOP count (``training_flops``) of one GPU's batch at ``--mfu`` of
    ``--peak-tflops``."""
    from imagebert_ds.model import PretrainingConfig, ImageBERTForPretraining
    from imagebert_ds.testing import contract_batch

    cfg = PretrainingConfig.from_dict({**PretrainingConfig.from_yaml(args.model).to_dict(),
                                     "objectives": {n: 1.0 for n in args.objectives}})
    with torch.device("meta"):
        model = ImageBERTForPretraining(cfg)
    batch = contract_batch(cfg, args.batch, text_len=args.text_tokens, regions=args.regions,
                           generator=torch.Generator().manual_seed(0), mlm_prob=0.15,
                           region_mask_prob=0.15, with_probs=False)
    flops = float(model.training_flops(batch))
    return flops / (args.mfu * args.peak_tflops * 1e12) * 1e3


def measured_step_ms(model_name: str):
    """(step ms, source) from the newest GPU ``train_step`` result of this model, or None."""
    best = None
    for path in sorted(common.RESULTS_DIR.glob("train_step-*.json")):
        data = json.loads(path.read_text())
        meta = data["meta"]
        if meta.get("mode") != "gpu" or meta.get("shapes", {}).get("model") != model_name:
            continue
        rows = {r["backend"]: r for r in data["rows"] if r.get("step_ms")}
        row = rows.get("trainer") or min(rows.values(), key=lambda r: r["step_ms"])
        if best is None or meta["date"] > best[2]:
            best = (row["step_ms"], f"{path.name} ({row['backend']}, {meta['device']})",
                    meta["date"])
    return best[:2] if best else None


def phase_s(nbytes: float, nodes: int, gpus: int, a) -> float:
    """Seconds of one hierarchical ring reduce-scatter or all-gather of ``nbytes`` per GPU."""
    if nodes * gpus == 1:
        return 0.0
    t = (gpus - 1) / gpus * nbytes / (a.nvlink_gbs * 1e9) + (gpus - 1) * a.nvlink_latency_us * 1e-6
    if nodes > 1:
        per_gpu_ib = a.ib_gbs * 1e9 / gpus
        t += (nodes - 1) / nodes * (nbytes / gpus) / per_gpu_ib + (nodes - 1) * a.ib_latency_us * 1e-6
    return t


def comm_s(zero_stage: int, psi: int, nodes: int, gpus: int, a) -> float:
    """Communication seconds per optimizer step: 2 Psi (ZeRO-0/1/2) or 3 Psi (ZeRO-3) elements,
    as that many reduce-scatter / all-gather phases of Psi elements."""
    phases = 3 if zero_stage == 3 else 2
    return phases * phase_s(psi * a.grad_bytes, nodes, gpus, a)


def step_s(compute: float, comm: float, overlap: float) -> tuple[float, float]:
    """(step seconds, exposed communication seconds)."""
    hidden = min(overlap * comm, 2.0 / 3.0 * compute)
    exposed = comm - hidden
    return compute + exposed, exposed


def model_rows(args, psi: int, t_micro: float) -> list[dict]:
    """Every (ZeRO stage, node count) row of the ImageBERT model."""
    rows = []
    G = args.gpus_per_node
    for zs in args.zero_stages:
        compute = args.accum * t_micro
        one_node = step_s(compute, comm_s(zs, psi, 1, G, args), args.overlap)[0]
        for M in NODES:
            comm = comm_s(zs, psi, M, G, args)
            t, exposed = step_s(compute, comm, args.overlap)
            rows.append({"zero_stage": zs, "nodes": M, "gpus": M * G,
                         "compute_ms": 1e3 * compute, "comm_ms": 1e3 * comm,
                         "exposed_comm_ms": 1e3 * exposed, "step_ms": 1e3 * t,
                         "samples_per_s": M * G * args.accum * args.batch / t,
                         "efficiency_vs_1gpu": compute / t, "efficiency_vs_1node": one_node / t})
    return rows


def reference(args) -> dict:
    """This model on NVIDIA's published configuration (DGX A100, BERT-large), next to their
    measured 94.9% at 32 nodes."""
    ns = argparse.Namespace(**{**vars(args), "nvlink_gbs": args.ref_nvlink_gbs,
                               "ib_gbs": args.ref_ib_gbs, "grad_bytes": 2})
    P = PUBLISHED
    t_micro = P["micro_batch_per_gpu"] / (P["throughput_1_node"] / P["gpus_per_node"])  # s
    accum_1 = P["global_batch"] // (P["micro_batch_per_gpu"] * P["gpus_per_node"])  # 32

    def throughput(nodes):
        accum = accum_1 // nodes
        t, _ = step_s(accum * t_micro, comm_s(0, BERT_LARGE_PARAMS, nodes, P["gpus_per_node"], ns),
                      args.overlap)
        return nodes * P["gpus_per_node"] * accum * P["micro_batch_per_gpu"] / t

    eff = throughput(P["nodes"]) / (P["nodes"] * throughput(1))
    return {"published": P, "assumed": {"params": BERT_LARGE_PARAMS, "nvlink_gbs": ns.nvlink_gbs,
                                        "ib_gbs": ns.ib_gbs, "grad_bytes": 2,
                                        "micro_step_ms": 1e3 * t_micro, "accum_1_node": accum_1,
                                        "overlap": args.overlap,
                                        "communication": "DDP all-reduce = 2 Psi"},
            "model_efficiency_32_nodes": eff, "published_efficiency_32_nodes": P["efficiency"],
            "model_minus_published": eff - P["efficiency"]}


def plot(ax, rows: list[dict], ref: dict) -> None:
    """Efficiency against one node per ZeRO stage, with the published point and the model's."""
    for zs in sorted({r["zero_stage"] for r in rows}):
        rs = [r for r in rows if r["zero_stage"] == zs]
        ax.plot([r["nodes"] for r in rs], [100 * r["efficiency_vs_1node"] for r in rs], "o-",
                label=f"ImageBERT, ZeRO-{zs} (model)")
    ax.plot([32], [100 * ref["published_efficiency_32_nodes"]], "r*", ms=12,
            label="NVIDIA BERT-large, DGX A100, measured (94.9%)")
    ax.plot([32], [100 * ref["model_efficiency_32_nodes"]], "kx", ms=9,
            label="this model on NVIDIA's config")
    ax.set_xscale("log", base=2)
    ax.set_xticks(NODES, [str(n) for n in NODES])
    ax.set_xlabel("nodes (x 8 GPUs)")
    ax.set_ylabel("weak-scaling efficiency vs 1 node (%)")
    ax.legend(fontsize=8)


def main() -> None:
    """Parse the assumptions, compute every row, print and write the results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "configs" / "model" / "base.yaml"))
    p.add_argument("--objectives", nargs="*", default=["mlm", "moc", "mrfr", "itm"])
    p.add_argument("--step-ms", type=float, default=None, help="measured single-GPU step (ms)")
    p.add_argument("--batch", type=int, default=64, help="micro-batch per GPU (samples)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--text-tokens", type=int, default=28, help="mean real text tokens (estimate)")
    p.add_argument("--regions", type=int, default=100, help="regions per sample (estimate)")
    p.add_argument("--mfu", type=float, default=0.4, help="MFU of the estimate")
    p.add_argument("--peak-tflops", type=float, default=989.4, help="H100 SXM dense bf16")
    p.add_argument("--zero-stages", type=int, nargs="*", default=[2, 3])
    p.add_argument("--grad-bytes", type=int, default=2, help="bytes per communicated element")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink-gbs", type=float, default=450.0,
                   help="NVLink GB/s per GPU per direction (H100 NVLink4: 900 bidirectional)")
    p.add_argument("--ib-gbs", type=float, default=400.0,
                   help="InfiniBand GB/s per node per direction (8 x 400 Gb/s NDR)")
    p.add_argument("--nvlink-latency-us", type=float, default=3.0)
    p.add_argument("--ib-latency-us", type=float, default=8.0)
    p.add_argument("--overlap", type=float, default=0.5,
                   help="fraction of the communication hidden behind the backward")
    p.add_argument("--ref-nvlink-gbs", type=float, default=300.0, help="A100 NVLink3 each way")
    p.add_argument("--ref-ib-gbs", type=float, default=200.0, help="DGX A100: 8 x 200 Gb/s HDR")
    common.add_common_args(p)
    args = p.parse_args()
    if not 0.0 <= args.overlap <= 1.0:
        p.error("--overlap must be in [0, 1]")

    psi = count_params(args.model, args.objectives)
    if args.step_ms is not None:
        step_ms, source = args.step_ms, "--step-ms"
    else:
        found = measured_step_ms(Path(args.model).name)
        if found:
            step_ms, source = found
        else:
            step_ms = estimate_step_ms(args)
            source = (f"estimate: training_flops of batch {args.batch} x ({args.text_tokens} text + "
                      f"{args.regions} regions) tokens at {args.mfu:.0%} MFU of "
                      f"{args.peak_tflops} TFLOP/s (no GPU train_step result for this model)")
    rows = model_rows(args, psi, step_ms * 1e-3)
    ref = reference(args)
    print(f"[scaling_model] Psi = {psi / 1e6:.1f}M parameters, step {step_ms:.1f} ms ({source})")
    common.print_table(rows, ["zero_stage", "nodes", "gpus", "compute_ms", "comm_ms",
                              "exposed_comm_ms", "step_ms", "samples_per_s",
                              "efficiency_vs_1gpu", "efficiency_vs_1node"])
    print(f"reference: NVIDIA BERT-large on 32 DGX A100 nodes measured "
          f"{ref['published_efficiency_32_nodes']:.1%}; this model predicts "
          f"{ref['model_efficiency_32_nodes']:.1%} for that configuration")
    if not args.no_write:
        assumptions = {k: v for k, v in vars(args).items()
                       if k not in ("out_dir", "no_write", "smoke")}
        meta = {"note": "a model, not a measurement: a bandwidth model fed with one step time",
                "params": psi, "step_ms": step_ms, "step_source": source,
                "assumptions": assumptions, "reference": ref,
                "formula": "t_phase = (G-1)/G*S/B_nvlink + (M-1)/M*(S/G)/B_ib + latencies; "
                           "ZeRO-0/1/2: 2 phases, ZeRO-3: 3; exposed = comm - min(overlap*comm, "
                           "2/3*compute)"}
        path = common.write_results("scaling", rows, meta, args.out_dir)
        common.save_plot(path, f"weak scaling model: {Path(args.model).name}, Psi "
                               f"{psi / 1e6:.0f}M, step {step_ms:.0f} ms, overlap {args.overlap}",
                         lambda ax: plot(ax, rows, ref))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
