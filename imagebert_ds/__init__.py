"""imagebert_ds: distributed cross-modal BERT pre-training (ImageBERT; pixel input is planned).

Sub-packages:
    model   -- the Transformer, embeddings, heads and losses (knows nothing of ranks/DeepSpeed/W&B)
    data    -- shard format, toy data, converters, validation, DALI loaders, collator
    train   -- DeepSpeed trainer, multi-stage runs, checkpoints, metrics, demo
    eval    -- retrieval evaluation (full / two-stage), ``imagebert-ds evaluate``, ``Scorer``
    kernels -- fused Triton kernels: ops (kernels, launchers, autograd, functional) + nn.Modules
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``from imagebert_ds import Scorer`` without importing torch for ``import imagebert_ds``
    if name == "Scorer":
        from imagebert_ds.eval.scorer import Scorer

        return Scorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
