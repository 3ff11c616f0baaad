"""Regenerate ``benchmarks/README.md`` from ``benchmarks/results/*.json``.

    python benchmarks/report.py                 # writes benchmarks/README.md
    python benchmarks/report.py --check         # exit 1 if README.md is out of date

For every benchmark: what it measures and against which baseline, then the latest result per
device (newest ``meta.date`` per benchmark, device and mode) as a table, its notes, and its plot
(the PNG of the same stem, written by ``common.save_plot``). A benchmark this file does not know
(a new script) still gets its table, with its script's docstring summary as the description.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"

# name -> (title, script, what it measures and what is the baseline, table columns)
BENCHMARKS = {
    "loader": (
        "Pre-training loader", "bench_loader.py",
        "Samples/s of `build_pretrain_loader` on synthetic shards at the paper's shape (100 "
        "regions x 2048-d float16 RoI features per image, boxes, classes, one caption; and "
        "640 x 480 JPEGs for the pixel rows), written as a foreign webdataset with plain "
        "`tarfile` (the index is built on first use). In the same run, on the same shards and "
        "the same number of CPU threads: the limit, a warm sequential read of every byte of the "
        "shard files (`raw_read`); the baseline, what a user would write (`baseline_*`: a "
        "`torch.utils.data.DataLoader` over a `tarfile` reader with `np.load`, PIL decode + "
        "torchvision-style resize / crop / normalize, and a collate that pads regions to "
        "float32 and masks 15%). `ratio_to_raw` is against the raw read of the same shards, "
        "`ratio_to_baseline` against the baseline of the same configuration. The loader is CPU "
        "work, so CPU numbers are real measurements of that machine (at few samples); the "
        "GPU-only mixed-decode rows are absent there.",
        ["row", "image_size", "threads", "batch", "samples_per_s", "mb_per_s", "ratio_to_raw",
         "ratio_to_baseline", "setup_s"]),
    "train_step": (
        "Pre-training step", "bench_train.py",
        "One optimizer step of ImageBERT's four objectives on realistic batches (10-40-token "
        "captions padded to the longest + detector regions): our model per attention backend "
        "(`eager`, `sdpa`, and on a GPU `triton`: varlen encoder + fused kernels); `trainer`, "
        "the real trainer (DeepSpeed engine with the run's ZeRO stage and precision, fed by the "
        "real loader from shards), read back from its `metrics.jsonl` after warm-up steps, with "
        "the data-wait fraction; and the baseline `hf_eager_baseline`, a padded eager "
        "transformers `BertModel` cross-encoder with HF's pre-training heads, plain torch AMP and "
        "AdamW, no DeepSpeed, on the same batch as the backend rows. `speedup_vs_hf` = samples/s "
        "over the baseline's. TFLOP/s use the trainer's FLOP formula (real tokens only). CPU "
        "runs use the tiny model in fp32: only the ratios mean something there.",
        ["backend", "step_ms", "samples_per_s", "tokens_per_s", "tflops", "mfu",
         "data_wait_frac", "peak_mem_mb", "speedup_vs_eager", "speedup_vs_hf"]),
    "scaling": (
        "Weak-scaling model", "scaling_model.py",
        "Not a measurement: a bandwidth model of data-parallel pre-training over 1-64 nodes x 8 "
        "GPUs, fed with one single-GPU step time (a GPU `train_step` result, `--step-ms`, or a "
        "labelled FLOP-based estimate). Communication per step is ZeRO-1/2: 2 Psi, ZeRO-3: 3 Psi "
        "elements as hierarchical ring phases over NVLink and InfiniBand, minus the part "
        "overlapped with the backward; all assumptions are flags, listed in the script's "
        "docstring and the JSON. It is checked against a published figure: NVIDIA's BERT-large "
        "on DGX A100, 94.9% at 32 nodes; the model run on that configuration is shown next to it.",
        ["zero_stage", "nodes", "gpus", "compute_ms", "comm_ms", "exposed_comm_ms", "step_ms",
         "samples_per_s", "efficiency_vs_1gpu", "efficiency_vs_1node"]),
    "attention": (
        "Flash attention", "bench_attention.py",
        "Triton flash attention (padded and varlen) forward / backward against every torch SDPA "
        "backend with the same boolean key mask and dropout, on ImageBERT-shaped batches (text + "
        "100 regions, right-padded). Baseline: the fastest SDPA backend that gives the correct "
        "masked result. CPU runs go through the Triton interpreter at tiny sizes: they check "
        "that the kernels run and agree, their timings are not speed.",
        ["L", "B", "padding_frac", "method", "max_err", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
         "fwd_bwd_tflops", "peak_mem_mb", "unsupported"]),
    "layernorm": (
        "Fused add + LayerNorm", "bench_layernorm.py",
        "The Triton fused residual-add + LayerNorm against torch eager (add, then "
        "`F.layer_norm`), forward and backward, at hidden 768. CPU runs use the Triton "
        "interpreter: correctness only, not speed.",
        ["rows", "hidden", "dtype", "method", "max_err", "fwd_bwd_ms", "fwd_bwd_gbps",
         "peak_mem_mb", "speedup_fwd_bwd_vs_eager"]),
    "mlm_loss": (
        "Fused MLM loss", "bench_mlm_loss.py",
        "The chunked fused MLM decoder + cross-entropy against gathered logits + "
        "`F.cross_entropy` and against HF's full logits over every token; the point is peak "
        "memory at vocab 30522 (GPU only). CPU runs use the Triton interpreter: correctness "
        "only.",
        ["n_masked", "n_tokens", "vocab", "method", "loss_err", "fwd_bwd_ms", "peak_mem_mb",
         "mem_ratio_vs_gathered_logits_ce", "mem_ratio_vs_hf_full_logits_ce"]),
}


def fmt(v) -> str:
    """A table cell: 3 significant digits, '-' for missing, strings shortened and escaped."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    s = str(v).replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= 60 else s[:57] + "..."


def table(rows: list[dict], columns: list[str] | None) -> list[str]:
    """Markdown table of ``rows``; columns that are empty in every row are dropped."""
    if columns is None:  # every scalar key, in order of first appearance
        columns = list(dict.fromkeys(k for r in rows for k, v in r.items()
                                     if not isinstance(v, (dict, list))))
    columns = [c for c in columns if any(r.get(c) is not None for r in rows)]
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return out


def script_summary(script: Path) -> str:
    """The first paragraph of a script's docstring (for benchmarks this file does not know)."""
    try:
        doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    except (OSError, SyntaxError):
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def latest(results_dir: Path) -> dict[str, list[tuple[Path, dict]]]:
    """benchmark -> [(json path, data)], the newest result per (device, mode), devices sorted."""
    best: dict[tuple[str, str, str], tuple[Path, dict]] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            meta = data["meta"]
            key = (meta["benchmark"], meta["device"], meta["mode"])
        except (json.JSONDecodeError, KeyError, TypeError):
            print(f"report: skipping {path.name} (not a results file)", file=sys.stderr)
            continue
        if key not in best or meta["date"] > best[key][1]["meta"]["date"]:
            best[key] = (path, data)
    out: dict[str, list] = {}
    for (name, _, _), v in sorted(best.items()):
        out.setdefault(name, []).append(v)
    return out


def highlights(name: str, meta: dict, rows: list[dict]) -> list[str]:
    """A few benchmark-specific lines under the table (targets, sources, comparisons)."""
    lines = []
    if name == "loader":
        t = meta.get("target_ours_regions_ratio_to_raw") or {}
        if t.get("got") is not None:
            ok = "met" if t["got"] >= t["want"] else "NOT met"
            lines.append(f"- Target `ours_regions` >= {t['want']} x `raw_read`: {t['got']:.3f} "
                         f"({ok}).")
        for row, why in (meta.get("skipped") or {}).items():
            lines.append(f"- `{row}` skipped: {why}.")
        d = meta.get("datasets", {})
        if d:
            lines.append("- Shards: " + "; ".join(
                f"{k} {v['shards']} x {v['per_shard']} samples, {v['bytes_per_sample'] / 1e3:.0f} "
                f"KB/sample" for k, v in d.items()) + ".")
        if meta.get("loadavg_start"):
            lines.append(f"- Load average at start / end: {meta['loadavg_start'][0]:.2f} / "
                         f"{meta['loadavg_end'][0]:.2f}.")
    elif name == "scaling":
        lines.append(f"- Psi = {meta['params'] / 1e6:.1f}M parameters; step "
                     f"{meta['step_ms']:.1f} ms from {meta['step_source']}.")
        ref = meta.get("reference")
        if ref:
            lines.append(f"- Published check: NVIDIA BERT-large, 32 DGX A100 nodes, measured "
                         f"{ref['published_efficiency_32_nodes']:.1%}; this model on that "
                         f"configuration: {ref['model_efficiency_32_nodes']:.1%} (the model "
                         f"ignores stragglers, congestion and protocol overheads, so it is an "
                         f"upper bound).")
    elif name == "train_step":
        tr = next((r for r in rows if r.get("backend") == "trainer"), None)
        if tr:
            lines.append(f"- `trainer`: ZeRO-{tr.get('zero_stage')}, {tr.get('precision')}, "
                         f"attention {tr.get('trainer_backend')}, {tr.get('steps_measured')} "
                         f"steps after {tr.get('steps_warmup')} warm-up steps; its batches come "
                         f"from shards of the same shape, not the fixed batch of the other rows.")
    shapes = meta.get("shapes")
    if shapes:
        flat = {k: v for k, v in shapes.items() if not isinstance(v, dict)}
        lines.append("- Shapes: " + ", ".join(f"{k} {v}" for k, v in flat.items()) + ".")
    return lines


def render(results_dir: Path = RESULTS) -> str:
    """The README's text."""
    found = latest(results_dir)
    order = [n for n in BENCHMARKS if n in found] + sorted(n for n in found if n not in BENCHMARKS)
    out = ["# Benchmarks", "",
           "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not "
           "edit by hand. Each script compares against a named baseline in the same run and "
           "writes a JSON (device, date, commit, versions, shapes) and a plot of the same stem "
           "under `results/`. Run one with `python benchmarks/<script>` (full sizes on a GPU; "
           "`--smoke` for the CPU sizes, which are also what runs without CUDA; `--no-write` to "
           "print only), then regenerate this file.", "",
           "Mode `gpu` = measured on the named GPU. Mode `cpu-smoke` = no CUDA: tiny sizes, "
           "labelled as such; Triton kernels run in the interpreter there, so kernel timings are "
           "not speed. The loader is CPU work, so its CPU rows are real measurements of that "
           "machine.", ""]
    out += ["| benchmark | script | results (device, mode) |", "|---|---|---|"]
    for name in order:
        title, script = BENCHMARKS.get(name, (name, None, None, None))[:2]
        script = script or Path(found[name][0][1]["meta"].get("argv", [""])[0]).name
        devs = ", ".join(f"{d['meta']['device']} ({d['meta']['mode']})" for _, d in found[name])
        out.append(f"| [{title}](#{name.replace('_', '-')}) | `{script}` | {devs} |")
    out.append("")
    for name in order:
        runs = found[name]
        if name in BENCHMARKS:
            title, script, text, columns = BENCHMARKS[name]
        else:
            script = Path(runs[0][1]["meta"].get("argv", [""])[0]).name
            title, columns = name, None
            text = script_summary(HERE / script)
        out += [f"<a id=\"{name.replace('_', '-')}\"></a>", f"## {title} (`{script}`)", "", text, ""]
        for path, data in runs:
            meta, rows = data["meta"], data["rows"]
            argv = list(meta.get("argv") or ["?"])
            command = " ".join([Path(argv[0]).name, *argv[1:]])
            out += [f"### {meta['device']} — {meta['mode']}", "",
                    f"{meta['date']}, commit `{meta.get('commit', '?')[:12]}`, `{command}` "
                    f"([JSON](results/{path.name}))", ""]
            if meta.get("note"):
                out += [f"> {meta['note']}", ""]
            out += table(rows, columns) + [""]
            extra = highlights(name, meta, rows)
            if extra:
                out += extra + [""]
            png = path.with_suffix(".png")
            if png.is_file():
                out += [f"![{title}, {meta['device']}](results/{png.name})", ""]
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    """Write README.md (or, with --check, compare it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--out", default=str(README))
    p.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    args = p.parse_args()
    text = render(Path(args.results))
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            sys.exit(f"{out} is out of date: run python benchmarks/report.py")
        return
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
