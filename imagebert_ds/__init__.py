"""imagebert_ds: distributed cross-modal BERT pre-training (ImageBERT, Pixel-BERT, the image-text
relation framework). Packages, lowest first (docs/architecture.md):

    model    -- architecture and pre-training configs, the Transformer, heads, objectives
    data     -- shard format, toy data, converters, validation, DALI loaders, batch building
    kernels  -- fused Triton kernels: ops (kernels, launchers, autograd, functional) + nn.Modules
    runtime  -- launch, distributed init, watchdog, run lock, logging, exit codes
    run      -- the run directory: layout, record, checkpoints, what --checkpoint names
    eval     -- retrieval evaluation (full / two-stage), ``imagebert-ds evaluate``, ``Scorer``
    relation -- k-means pseudo-labels, linear probe, Grad-CAM
    train    -- run configs, the DeepSpeed trainer, stage hooks, metrics
    demo     -- ``imagebert-ds demo``
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``from imagebert_ds import Scorer`` without importing torch for ``import imagebert_ds``
    if name == "Scorer":
        from imagebert_ds.eval.scorer import Scorer

        return Scorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
