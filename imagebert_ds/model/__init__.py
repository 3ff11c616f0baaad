"""ImageBERT model: config, encoder (``ImageBERTModel``) and pre-training heads/losses.

    from imagebert_ds.model import ImageBERTConfig, ImageBERTModel, ImageBERTForPretraining
"""
from .config import ImageBERTConfig, ITCConfig, MOCConfig, PretrainingConfig, TaskConfig
from .modeling import ImageBERTModel, read_bert_state_dict
from .pretraining import MODEL_INPUT_KEYS, ImageBERTForPretraining

__all__ = ["ImageBERTConfig", "PretrainingConfig", "TaskConfig", "MOCConfig", "ITCConfig",
           "ImageBERTModel", "ImageBERTForPretraining", "MODEL_INPUT_KEYS", "read_bert_state_dict"]
