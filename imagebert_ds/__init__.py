"""imagebert_ds: distributed cross-modal BERT pre-training (ImageBERT; pixel input is planned).

Sub-packages:
    model   -- the Transformer, embeddings, heads and losses (knows nothing of ranks/DeepSpeed/W&B)
    data    -- shard format, toy data, converters, validation, DALI loaders, collator
    train   -- DeepSpeed trainer, multi-stage runs, checkpoints, metrics, demo
    kernels -- fused Triton kernels (shipped from the top-level ``kernels/`` folder)
"""

__version__ = "0.1.0"
