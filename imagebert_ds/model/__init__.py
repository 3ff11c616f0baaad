"""ImageBERT model: the architecture config, the encoder (``ImageBERTModel``), the pre-training
config and model (``PretrainingConfig``, ``ImageBERTForPretraining``) and its objectives.

    from imagebert_ds.model import PretrainingConfig, ImageBERTModel, ImageBERTForPretraining
"""
from .config import ImageBERTConfig
from .modeling import ImageBERTModel, read_bert_state_dict
from .objectives import DEFAULT_OBJECTIVES, REGISTRY as OBJECTIVES, Objective, ObjectiveConfig
from .pretraining import MODEL_INPUT_KEYS, ImageBERTForPretraining, PretrainingConfig
from .registry import list_models

__all__ = ["ImageBERTConfig", "PretrainingConfig", "ImageBERTModel", "ImageBERTForPretraining",
           "MODEL_INPUT_KEYS", "list_models",
           "read_bert_state_dict", "OBJECTIVES", "DEFAULT_OBJECTIVES", "Objective", "ObjectiveConfig"]
